//! Reading ELF files: the contents of a section by name (a kernel module's
//! `.modinfo`) and whether an executable is statically linked (no
//! `PT_INTERP` program header).
//!
//! Built on the `object` crate (0.39, gimli-rs; the ELF reader std's
//! backtraces use), which replaced ~130 lines of hand-written offset
//! arithmetic. The inputs are host files (`/lib/modules`, the busybox
//! binary, our guest build); what matters is that a truncated or odd file is
//! an error, never a panic or a wrong slice, and a reader that many tools
//! depend on is the better bet for that than our own. Only 64-bit
//! little-endian files are accepted: the guest is x86-64.

use anyhow::{ensure, Context, Result};
use object::elf::{PT_INTERP, SHT_NOBITS};
use object::read::elf::{ElfFile64, FileHeader, ProgramHeader};
use object::{LittleEndian, Object, ObjectSection};

pub use object::elf::EM_X86_64;

/// A parsed 64-bit little-endian ELF file.
pub struct Elf<'a> {
    file: ElfFile64<'a, LittleEndian>,
    /// `e_machine` of the header.
    pub machine: u16,
}

impl<'a> Elf<'a> {
    /// Parses the header, program headers and section headers of `data`.
    pub fn parse(data: &'a [u8]) -> Result<Self> {
        // The ident checks first, for errors that say what the file is not.
        ensure!(
            data.len() >= 64 && data[..4] == *b"\x7fELF",
            "not an ELF file"
        );
        ensure!(data[4] == 2, "not a 64-bit ELF file");
        ensure!(data[5] == 1, "not a little-endian ELF file");
        let file = ElfFile64::<LittleEndian>::parse(data).context("malformed ELF file")?;
        let machine = file.elf_header().e_machine(LittleEndian);
        Ok(Self { file, machine })
    }

    /// True if the file names a dynamic loader (i.e. it is dynamically linked).
    pub fn has_interp(&self) -> bool {
        self.file
            .elf_program_headers()
            .iter()
            .any(|ph| ph.p_type(LittleEndian) == PT_INTERP)
    }

    /// The contents of the section called `name`, if there is one.
    pub fn section(&self, name: &str) -> Result<Option<&'a [u8]>> {
        let Some(section) = self.file.section_by_name(name) else {
            return Ok(None);
        };
        let header = section.elf_section_header();
        ensure!(
            header.sh_type.get(LittleEndian) != SHT_NOBITS,
            "ELF section {name} has no contents in the file"
        );
        let data = section
            .data()
            .with_context(|| format!("ELF section {name} lies outside the file"))?;
        Ok(Some(data))
    }
}

/// Checks that `data` is a statically linked x86-64 executable.
pub fn check_static_x86_64(data: &[u8]) -> Result<()> {
    let elf = Elf::parse(data)?;
    ensure!(
        elf.machine == EM_X86_64,
        "not an x86-64 binary (e_machine {})",
        elf.machine
    );
    ensure!(
        !elf.has_interp(),
        "dynamically linked (has a PT_INTERP program header)"
    );
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Builds a tiny ELF64 file with the given sections and, optionally, a
    /// PT_INTERP program header: header, section table and section types
    /// just valid enough for `object`.
    pub(crate) fn build_elf(sections: &[(&str, &[u8])], interp: bool) -> Vec<u8> {
        let mut shstrtab = vec![0u8];
        let mut name_offs = Vec::new();
        for (name, _) in sections.iter().copied().chain([(".shstrtab", &[][..])]) {
            name_offs.push(shstrtab.len() as u32);
            shstrtab.extend_from_slice(name.as_bytes());
            shstrtab.push(0);
        }
        let mut out = vec![0u8; 64];
        let phoff = out.len() as u64;
        if interp {
            let mut ph = [0u8; 56];
            ph[..4].copy_from_slice(&PT_INTERP.to_le_bytes());
            out.extend_from_slice(&ph);
        }
        let mut ranges = Vec::new();
        let types = sections
            .iter()
            .map(|_| object::elf::SHT_PROGBITS)
            .chain([object::elf::SHT_STRTAB]);
        for (_, data) in sections
            .iter()
            .copied()
            .chain([(".shstrtab", &shstrtab[..])])
        {
            ranges.push((out.len() as u64, data.len() as u64));
            out.extend_from_slice(data);
        }
        let shoff = out.len() as u64;
        out.extend_from_slice(&[0u8; 64]); // null section
        for ((name_off, (off, size)), sh_type) in name_offs.iter().zip(&ranges).zip(types) {
            let mut sh = [0u8; 64];
            sh[..4].copy_from_slice(&name_off.to_le_bytes());
            sh[4..8].copy_from_slice(&sh_type.to_le_bytes());
            sh[24..32].copy_from_slice(&off.to_le_bytes());
            sh[32..40].copy_from_slice(&size.to_le_bytes());
            out.extend_from_slice(&sh);
        }
        let shnum = (sections.len() + 2) as u16;
        out[..4].copy_from_slice(b"\x7fELF");
        out[4] = 2;
        out[5] = 1;
        out[6] = 1; // EV_CURRENT
        out[18..20].copy_from_slice(&EM_X86_64.to_le_bytes());
        out[32..40].copy_from_slice(&phoff.to_le_bytes());
        out[40..48].copy_from_slice(&shoff.to_le_bytes());
        out[54..56].copy_from_slice(&56u16.to_le_bytes());
        out[56..58].copy_from_slice(&u16::from(interp).to_le_bytes());
        out[58..60].copy_from_slice(&64u16.to_le_bytes());
        out[60..62].copy_from_slice(&shnum.to_le_bytes());
        out[62..64].copy_from_slice(&(shnum - 1).to_le_bytes());
        out
    }

    #[test]
    fn finds_sections_by_name() {
        let elf = build_elf(&[(".text", b"\x90\x90"), (".modinfo", b"a=b\0")], false);
        let e = Elf::parse(&elf).unwrap();
        assert_eq!(e.section(".modinfo").unwrap(), Some(&b"a=b\0"[..]));
        assert_eq!(e.section(".text").unwrap(), Some(&b"\x90\x90"[..]));
        assert_eq!(e.section(".missing").unwrap(), None);
        assert!(!e.has_interp());
        check_static_x86_64(&elf).unwrap();
    }

    #[test]
    fn detects_dynamic_executables() {
        let elf = build_elf(&[], true);
        assert!(Elf::parse(&elf).unwrap().has_interp());
        assert!(check_static_x86_64(&elf).is_err());
    }

    #[test]
    fn rejects_garbage_without_panicking() {
        let section = |elf: &[u8]| Elf::parse(elf).and_then(|e| e.section(".modinfo").map(drop));
        assert!(Elf::parse(b"#!/bin/sh\n").is_err());
        let mut elf = build_elf(&[(".modinfo", b"x")], false);
        // Point the section headers past the end of the file.
        elf[40..48].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(section(&elf).is_err());
        // A truncated file.
        let elf = build_elf(&[(".modinfo", b"x")], false);
        assert!(section(&elf[..80]).is_err());
        // A section whose contents lie past the end of the file.
        let mut elf = build_elf(&[(".modinfo", b"x")], false);
        let shoff = u64::from_le_bytes(elf[40..48].try_into().unwrap()) as usize;
        let modinfo_sh = shoff + 64;
        elf[modinfo_sh + 24..modinfo_sh + 32].copy_from_slice(&(1u64 << 40).to_le_bytes());
        let e = Elf::parse(&elf).unwrap();
        assert!(e.section(".modinfo").is_err());
        // 32-bit and big-endian files are refused by name.
        let mut elf = build_elf(&[], false);
        elf[4] = 1;
        assert!(format!("{:#}", Elf::parse(&elf).err().unwrap()).contains("64-bit"));
        elf[4] = 2;
        elf[5] = 2;
        assert!(format!("{:#}", Elf::parse(&elf).err().unwrap()).contains("little-endian"));
    }
}
