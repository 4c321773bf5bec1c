//! The x86 Linux boot protocol's setup header in a bzImage: the
//! `initrd_addr_max` field, set so that QEMU's `microvm` never loads the
//! initrd over the firmware's tables.
//!
//! Why: with Debian's kernel (`initrd_addr_max` = 2 GiB − 1) and QEMU 10.0
//! (Debian's), a guest with exactly 2 GiB got its initrd flush against the
//! top of RAM, where the firmware keeps the ACPI tables and its own data in
//! the last three pages, instead of 64 KiB below it as at every other size.
//! Whether the guest then hung (in SeaBIOS or in the kernel's ACPI checksum
//! loop) depended on the initramfs size to the byte: 2 773 876 bytes booted,
//! 2 780 777 hung. Measured on this QEMU, the flush placement happens exactly
//! when `initrd_addr_max` + 1 equals the guest's memory size (also 1 GiB
//! with a field of 1 GiB − 1, 896 MiB with 896 MiB − 1); any other value gives
//! the placement 64 KiB below the top (checked 256 MiB to 4 GiB, both sizes
//! above). Guest memory is a whole number of MiB, so a field that does not end
//! in `fffff` can never equal it minus one. The kernel accepts an initrd
//! anywhere below 4 GiB (`XLF_CAN_BE_LOADED_ABOVE_4G`), so lowering the field
//! by a page costs nothing.

use anyhow::{bail, Result};

/// The `initrd_addr_max` of every image: 2 GiB − 4 KiB − 1, which is not a
/// whole number of MiB minus one (see the module documentation).
pub const INITRD_ADDR_MAX: u32 = 0x7fff_efff;

/// Offset of the `HdrS` magic that marks a setup header.
const MAGIC_OFFSET: usize = 0x202;
/// Offset of the boot protocol version (u16, little endian).
const VERSION_OFFSET: usize = 0x206;
/// Offset of `initrd_addr_max` (u32, little endian; protocol 2.03 and later).
const INITRD_ADDR_MAX_OFFSET: usize = 0x22c;

/// Lowers the bzImage's `initrd_addr_max` to `max` (never raises it).
/// Returns the value the kernel had. Fails on anything that is not a bzImage
/// with boot protocol 2.03 or later.
pub fn cap_initrd_addr_max(bzimage: &mut [u8], max: u32) -> Result<u32> {
    if bzimage.len() < INITRD_ADDR_MAX_OFFSET + 4 || &bzimage[MAGIC_OFFSET..][..4] != b"HdrS" {
        bail!("the kernel is not an x86 bzImage (no \"HdrS\" setup header at 0x202)");
    }
    let version = u16::from_le_bytes([bzimage[VERSION_OFFSET], bzimage[VERSION_OFFSET + 1]]);
    if version < 0x0203 {
        bail!(
            "the kernel's boot protocol {}.{:02} has no initrd_addr_max (2.03 or later needed)",
            version >> 8,
            version & 0xff
        );
    }
    let field = &mut bzimage[INITRD_ADDR_MAX_OFFSET..][..4];
    let old = u32::from_le_bytes([field[0], field[1], field[2], field[3]]);
    field.copy_from_slice(&old.min(max).to_le_bytes());
    Ok(old)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(version: u16, initrd_addr_max: u32) -> Vec<u8> {
        let mut image = vec![0u8; 0x400];
        image[MAGIC_OFFSET..][..4].copy_from_slice(b"HdrS");
        image[VERSION_OFFSET..][..2].copy_from_slice(&version.to_le_bytes());
        image[INITRD_ADDR_MAX_OFFSET..][..4].copy_from_slice(&initrd_addr_max.to_le_bytes());
        image
    }

    fn initrd_addr_max(image: &[u8]) -> u32 {
        u32::from_le_bytes(image[INITRD_ADDR_MAX_OFFSET..][..4].try_into().unwrap())
    }

    #[test]
    fn lowers_the_limit_and_changes_nothing_else() {
        let mut image = header(0x020f, 0x7fff_ffff);
        let before = image.clone();
        assert_eq!(
            cap_initrd_addr_max(&mut image, INITRD_ADDR_MAX).unwrap(),
            0x7fff_ffff
        );
        assert_eq!(initrd_addr_max(&image), INITRD_ADDR_MAX);
        let changed: Vec<usize> = (0..image.len())
            .filter(|&i| image[i] != before[i])
            .collect();
        assert_eq!(changed, [INITRD_ADDR_MAX_OFFSET + 1]);
    }

    #[test]
    fn never_raises_the_limit() {
        let mut image = header(0x020f, 0x1fff_ffff);
        cap_initrd_addr_max(&mut image, INITRD_ADDR_MAX).unwrap();
        assert_eq!(initrd_addr_max(&image), 0x1fff_ffff);
    }

    #[test]
    fn the_limit_is_never_a_whole_number_of_mib_minus_one() {
        assert_ne!((INITRD_ADDR_MAX + 1) % (1 << 20), 0);
    }

    #[test]
    fn refuses_what_is_not_a_bzimage_and_leaves_it_alone() {
        let mut short = vec![0u8; 16];
        assert!(cap_initrd_addr_max(&mut short, INITRD_ADDR_MAX).is_err());
        let mut elf = header(0x020f, 0x7fff_ffff);
        elf[MAGIC_OFFSET..][..4].copy_from_slice(b"\x7fELF");
        let before = elf.clone();
        let err = cap_initrd_addr_max(&mut elf, INITRD_ADDR_MAX).unwrap_err();
        assert!(err.to_string().contains("not an x86 bzImage"), "{err}");
        assert_eq!(elf, before);
        let mut old = header(0x0202, 0x7fff_ffff);
        let err = cap_initrd_addr_max(&mut old, INITRD_ADDR_MAX).unwrap_err();
        assert!(err.to_string().contains("2.02"), "{err}");
    }
}
