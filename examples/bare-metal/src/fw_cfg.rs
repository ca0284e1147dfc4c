//! QEMU firmware configuration interface (I/O ports 0x510/0x511), used only
//! to learn how many CPUs the machine has when the command line does not say.

use crate::cpu;

const SELECTOR_PORT: u16 = 0x510;
const DATA_PORT: u16 = 0x511;
const KEY_SIGNATURE: u16 = 0x00;
const KEY_NB_CPUS: u16 = 0x05;

fn read_item<const N: usize>(key: u16) -> [u8; N] {
    let mut bytes = [0u8; N];
    // SAFETY: selecting a fw_cfg item and reading its bytes has no effect
    // beyond advancing the item's read offset; absent hardware reads 0xff.
    unsafe {
        cpu::outw(SELECTOR_PORT, key);
        for byte in &mut bytes {
            *byte = cpu::inb(DATA_PORT);
        }
    }
    bytes
}

/// Number of CPUs QEMU was started with (`-smp`), if fw_cfg is present.
pub fn cpu_count() -> Option<u16> {
    if read_item::<4>(KEY_SIGNATURE) != *b"QEMU" {
        return None;
    }
    Some(u16::from_le_bytes(read_item::<2>(KEY_NB_CPUS)))
}
