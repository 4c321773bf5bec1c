//! QEMU backend (being built).
