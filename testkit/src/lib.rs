//! Host-side test kit for hmm-core.
