//! A minimal, bounds-checked ELF64 little-endian reader: just enough to find
//! a section by name (a kernel module's `.modinfo`) and to tell whether an
//! executable is statically linked (no `PT_INTERP` program header).

use anyhow::{bail, ensure, Context, Result};

pub const EM_X86_64: u16 = 62;
const PT_INTERP: u32 = 3;
const SHN_XINDEX: u16 = 0xffff;

pub struct Elf<'a> {
    data: &'a [u8],
    pub machine: u16,
    phoff: u64,
    phentsize: u16,
    phnum: u16,
    shoff: u64,
    shentsize: u16,
    shnum: u16,
    shstrndx: u16,
}

fn rd<const N: usize>(data: &[u8], off: u64) -> Result<[u8; N]> {
    let off = usize::try_from(off)?;
    let end = off.checked_add(N).context("ELF offset overflow")?;
    let s = data.get(off..end).context("ELF structure out of bounds")?;
    Ok(s.try_into().expect("length checked"))
}
/// Offset of entry `i` of a table at `base` with entries of `size` bytes.
fn entry_off(base: u64, i: u64, size: u16) -> Result<u64> {
    i.checked_mul(u64::from(size))
        .and_then(|o| o.checked_add(base))
        .context("ELF offset overflow")
}
fn u16_at(d: &[u8], off: u64) -> Result<u16> {
    Ok(u16::from_le_bytes(rd(d, off)?))
}
fn u32_at(d: &[u8], off: u64) -> Result<u32> {
    Ok(u32::from_le_bytes(rd(d, off)?))
}
fn u64_at(d: &[u8], off: u64) -> Result<u64> {
    Ok(u64::from_le_bytes(rd(d, off)?))
}

impl<'a> Elf<'a> {
    pub fn parse(data: &'a [u8]) -> Result<Self> {
        ensure!(
            data.len() >= 64 && data[..4] == *b"\x7fELF",
            "not an ELF file"
        );
        ensure!(data[4] == 2, "not a 64-bit ELF file");
        ensure!(data[5] == 1, "not a little-endian ELF file");
        let elf = Self {
            data,
            machine: u16_at(data, 18)?,
            phoff: u64_at(data, 32)?,
            shoff: u64_at(data, 40)?,
            phentsize: u16_at(data, 54)?,
            phnum: u16_at(data, 56)?,
            shentsize: u16_at(data, 58)?,
            shnum: u16_at(data, 60)?,
            shstrndx: u16_at(data, 62)?,
        };
        if elf.phnum > 0 {
            ensure!(elf.phentsize >= 56, "bad ELF program header size");
        }
        if elf.shnum > 0 {
            ensure!(elf.shentsize >= 64, "bad ELF section header size");
        }
        Ok(elf)
    }

    /// True if the file names a dynamic loader (i.e. it is dynamically linked).
    pub fn has_interp(&self) -> Result<bool> {
        for i in 0..u64::from(self.phnum) {
            let ph = entry_off(self.phoff, i, self.phentsize)?;
            if u32_at(self.data, ph)? == PT_INTERP {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// The contents of the section called `name`, if there is one.
    pub fn section(&self, name: &str) -> Result<Option<&'a [u8]>> {
        if self.shnum == 0 {
            return Ok(None);
        }
        if self.shstrndx == SHN_XINDEX || self.shstrndx >= self.shnum {
            bail!("unsupported ELF section name table index");
        }
        let (stroff, strsize) = self.section_range(self.shstrndx)?;
        let strtab = self.slice(stroff, strsize)?;
        for i in 0..self.shnum {
            let sh = entry_off(self.shoff, u64::from(i), self.shentsize)?;
            let name_off = usize::try_from(u32_at(self.data, sh)?)?;
            let Some(rest) = strtab.get(name_off..) else {
                continue;
            };
            let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
            if &rest[..end] == name.as_bytes() {
                let (off, size) = self.section_range(i)?;
                return Ok(Some(self.slice(off, size)?));
            }
        }
        Ok(None)
    }

    fn section_range(&self, i: u16) -> Result<(u64, u64)> {
        let sh = entry_off(self.shoff, u64::from(i), self.shentsize)?;
        let size_off = sh.checked_add(32).context("ELF offset overflow")?;
        Ok((
            u64_at(self.data, size_off - 8)?,
            u64_at(self.data, size_off)?,
        ))
    }

    fn slice(&self, off: u64, size: u64) -> Result<&'a [u8]> {
        let off = usize::try_from(off)?;
        let end = off
            .checked_add(usize::try_from(size)?)
            .context("ELF section overflow")?;
        self.data.get(off..end).context("ELF section out of bounds")
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
        !elf.has_interp()?,
        "dynamically linked (has a PT_INTERP program header)"
    );
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Builds a tiny ELF64 file with the given sections and, optionally, a
    /// PT_INTERP program header. Good enough for the reader above.
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
        for (name_off, (off, size)) in name_offs.iter().zip(&ranges) {
            let mut sh = [0u8; 64];
            sh[..4].copy_from_slice(&name_off.to_le_bytes());
            sh[24..32].copy_from_slice(&off.to_le_bytes());
            sh[32..40].copy_from_slice(&size.to_le_bytes());
            out.extend_from_slice(&sh);
        }
        let shnum = (sections.len() + 2) as u16;
        out[..4].copy_from_slice(b"\x7fELF");
        out[4] = 2;
        out[5] = 1;
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
        assert!(!e.has_interp().unwrap());
        check_static_x86_64(&elf).unwrap();
    }

    #[test]
    fn detects_dynamic_executables() {
        let elf = build_elf(&[], true);
        assert!(Elf::parse(&elf).unwrap().has_interp().unwrap());
        assert!(check_static_x86_64(&elf).is_err());
    }

    #[test]
    fn rejects_garbage_without_panicking() {
        assert!(Elf::parse(b"#!/bin/sh\n").is_err());
        let mut elf = build_elf(&[(".modinfo", b"x")], false);
        // Point the section headers past the end of the file.
        elf[40..48].copy_from_slice(&u64::MAX.to_le_bytes());
        let e = Elf::parse(&elf).unwrap();
        assert!(e.section(".modinfo").is_err());
        // A truncated file.
        let elf = build_elf(&[(".modinfo", b"x")], false);
        let e = Elf::parse(&elf[..80]).unwrap();
        assert!(e.section(".modinfo").is_err());
    }
}
