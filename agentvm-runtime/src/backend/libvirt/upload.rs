//! Getting a guest image onto a remote libvirt host through the storage API.
//!
//! Each remote host gets a directory storage pool of agentvm's own
//! ([`STORAGE_POOL`], at [`DEFAULT_POOL_DIR`] on that host, created and
//! started when missing). Every image file becomes a volume named after its
//! content (`agentvm-<first 16 hex digits of its SHA-256>-<kind>`), so a
//! host that already has the volume is not sent it again, and a rebuilt
//! image gets new volumes beside the old ones.
//!
//! A volume is created empty (capacity 0) and grows while the file is
//! streamed in (`virStorageVolCreateXML` + `virStorageVolUpload`), so a
//! volume whose size is not the file's is an upload that was cut short: it
//! is deleted and uploaded again. Uploads of one volume by processes of this
//! machine are serialised by a lock file in the runtime directory.
//!
//! The per-VM state disk (qcow2 for the snapshots) is a volume of the same
//! pool too (`<domain name>-state.qcow2`), deleted with the VM.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Instant, SystemTime};

use sha2::{Digest, Sha256};
use virt::connect::Connect;
use virt::enumutil::Enum;
use virt::error::{Error as VirtError, ErrorNumber};
use virt::storage_pool::StoragePool;
use virt::storage_vol::StorageVol;
use virt::stream::Stream;

use super::domain_xml::xml_escape;
use crate::backend::BackendError;

/// Name of agentvm's storage pool on every remote host.
pub const STORAGE_POOL: &str = "agentvm";
/// Where that pool keeps its files on the remote host.
pub const DEFAULT_POOL_DIR: &str = "/var/lib/libvirt/agentvm";
const CHUNK: usize = 1 << 20;

/// The XML of agentvm's directory pool at `dir`.
pub fn pool_xml(dir: &str) -> String {
    format!(
        "<pool type='dir'>\n  <name>{STORAGE_POOL}</name>\n  <target>\n    <path>{}</path>\n  </target>\n</pool>\n",
        xml_escape(dir)
    )
}

/// The volume name of an image file of `kind` (`kernel`, `initramfs`,
/// `rootfs`) whose SHA-256 is `sha256_hex`.
pub fn volume_name(sha256_hex: &str, kind: &str) -> String {
    format!("agentvm-{}-{kind}", &sha256_hex[..sha256_hex.len().min(16)])
}

/// The XML of a volume: `raw` created empty (it grows with the upload) or
/// `qcow2` of `capacity_mib`.
pub fn volume_xml(name: &str, format: &str, capacity_mib: u64) -> String {
    format!(
        "<volume>\n  <name>{}</name>\n  <capacity unit='MiB'>{capacity_mib}</capacity>\n  <target>\n    <format type='{format}'/>\n  </target>\n</volume>\n",
        xml_escape(name)
    )
}

/// What a host's volume says about an upload of `expected` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VolumeCheck {
    /// Not there: upload.
    Missing,
    /// There with the file's size: use it.
    Complete,
    /// There with another size (an upload cut short): delete and upload.
    Partial,
}

/// [`VolumeCheck`] from a volume's capacity (`None`: no volume).
pub fn check_volume(capacity: Option<u64>, expected: u64) -> VolumeCheck {
    match capacity {
        None => VolumeCheck::Missing,
        Some(c) if c == expected => VolumeCheck::Complete,
        Some(_) => VolumeCheck::Partial,
    }
}

/// SHA-256 of a file (hex), remembered per path, size and modification time
/// for the life of the process (the `agent` image's root file system is
/// hundreds of MB).
pub fn file_sha256(path: &Path) -> std::io::Result<String> {
    /// (path, size, modification time) → hash.
    type Hashes = HashMap<(PathBuf, u64, SystemTime), String>;
    static CACHE: Mutex<Option<Hashes>> = Mutex::new(None);
    let meta = std::fs::metadata(path)?;
    let key = (path.to_path_buf(), meta.len(), meta.modified()?);
    if let Some(hash) = CACHE
        .lock()
        .expect("hash cache")
        .as_ref()
        .and_then(|m| m.get(&key))
    {
        return Ok(hash.clone());
    }
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    let hash: String = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    CACHE
        .lock()
        .expect("hash cache")
        .get_or_insert_with(HashMap::new)
        .insert(key, hash.clone());
    Ok(hash)
}

fn is_code(e: &VirtError, code: ErrorNumber) -> bool {
    matches!(e.code(), Enum::Known(c) if c == code)
}

fn storage_error(uri: &str, what: &str, e: &VirtError) -> BackendError {
    BackendError::Io {
        context: format!("libvirt host {uri}: {what}"),
        source: std::io::Error::other(e.message().to_owned()),
    }
}

/// agentvm's storage pool on the host of `c`, defined, built and started
/// when needed (blocking).
pub fn ensure_pool(c: &Connect, uri: &str, dir: &str) -> Result<StoragePool, BackendError> {
    let pool = match c.lookup_storage_pool_by_name(STORAGE_POOL) {
        Ok(p) => p,
        Err(e) if is_code(&e, ErrorNumber::NoStoragePool) => {
            tracing::info!(uri, dir, "defining the agentvm storage pool");
            let p = c
                .define_storage_pool_xml(&pool_xml(dir), 0)
                .map_err(|e| storage_error(uri, "virStoragePoolDefineXML", &e))?;
            p.build(0)
                .map_err(|e| storage_error(uri, "virStoragePoolBuild", &e))?;
            let _ = p.set_autostart(true);
            p
        }
        Err(e) if is_code(&e, ErrorNumber::NoSupport) => {
            return Err(BackendError::Io {
                context: format!(
                    "libvirt host {uri} has no storage driver, which agentvm needs to upload \
                     the image: install libvirt-daemon-driver-storage there and restart its daemon"
                ),
                source: std::io::Error::other(e.message().to_owned()),
            })
        }
        Err(e) => return Err(storage_error(uri, "virStoragePoolLookupByName", &e)),
    };
    if !pool.is_active().unwrap_or(false) {
        if let Err(e) = pool.create(0) {
            // Another process may have started it meanwhile.
            if !pool.is_active().unwrap_or(false) {
                return Err(storage_error(uri, "virStoragePoolCreate", &e));
            }
        }
    }
    Ok(pool)
}

/// The remote path of the volume holding `file`, uploading it first when
/// the host does not have it (blocking). `kind` names the file in the
/// volume name and the progress lines; `lock_dir` holds this machine's lock
/// files.
pub fn ensure_file(
    pool: &StoragePool,
    c: &Connect,
    uri: &str,
    file: &Path,
    kind: &str,
    lock_dir: &Path,
) -> Result<String, BackendError> {
    let io = |context: String| move |source| BackendError::Io { context, source };
    let hash = file_sha256(file).map_err(io(format!("hashing {}", file.display())))?;
    let size = std::fs::metadata(file)
        .map_err(io(format!("reading {}", file.display())))?
        .len();
    let name = volume_name(&hash, kind);
    std::fs::create_dir_all(lock_dir).map_err(io(format!("creating {}", lock_dir.display())))?;
    let lock_path = lock_dir.join(format!("{}-{name}.lock", &hex_sha256(uri.as_bytes())[..16]));
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(io(format!("opening {}", lock_path.display())))?;
    rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive).map_err(|e| {
        BackendError::Io {
            context: format!("locking {}", lock_path.display()),
            source: e.into(),
        }
    })?;
    let existing = match pool.lookup_storage_vol_by_name(&name) {
        Ok(v) => Some(v),
        Err(e) if is_code(&e, ErrorNumber::NoStorageVolume) => None,
        Err(e) => return Err(storage_error(uri, "virStorageVolLookupByName", &e)),
    };
    let capacity = match &existing {
        Some(v) => Some(
            v.info()
                .map_err(|e| storage_error(uri, "virStorageVolGetInfo", &e))?
                .capacity,
        ),
        None => None,
    };
    match check_volume(capacity, size) {
        VolumeCheck::Complete => {
            let vol = existing.expect("complete volume");
            tracing::debug!(uri, volume = %name, "image file already on the host");
            return vol
                .path()
                .map_err(|e| storage_error(uri, "virStorageVolGetPath", &e));
        }
        VolumeCheck::Partial => {
            tracing::warn!(uri, volume = %name, ?capacity, size, "incomplete volume (an upload was cut short): uploading again");
            if let Some(v) = existing {
                v.delete(0)
                    .map_err(|e| storage_error(uri, "virStorageVolDelete", &e))?;
            }
        }
        VolumeCheck::Missing => {}
    }
    let vol = StorageVol::create_xml(pool, &volume_xml(&name, "raw", 0), 0)
        .map_err(|e| storage_error(uri, "virStorageVolCreateXML", &e))?;
    match upload(c, &vol, file, size, kind, uri) {
        Ok(()) => vol
            .path()
            .map_err(|e| storage_error(uri, "virStorageVolGetPath", &e)),
        Err(e) => {
            let _ = vol.delete(0);
            Err(e)
        }
    }
}

fn hex_sha256(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Streams `file` into `vol`, printing progress (every 25 %) on stderr.
fn upload(
    c: &Connect,
    vol: &StorageVol,
    file: &Path,
    size: u64,
    kind: &str,
    uri: &str,
) -> Result<(), BackendError> {
    let started = Instant::now();
    let mib = size as f64 / (1024.0 * 1024.0);
    eprintln!("agentvm: uploading the image's {kind} ({mib:.1} MiB) to libvirt host {uri}");
    let stream = Stream::new(c, 0).map_err(|e| storage_error(uri, "virStreamNew", &e))?;
    vol.upload(&stream, 0, size, 0)
        .map_err(|e| storage_error(uri, "virStorageVolUpload", &e))?;
    let mut f = std::fs::File::open(file).map_err(|source| BackendError::Io {
        context: format!("reading {}", file.display()),
        source,
    })?;
    let mut buf = vec![0u8; CHUNK];
    let mut sent = 0u64;
    let mut next_report = 25;
    let result: Result<(), BackendError> = loop {
        let n = match f.read(&mut buf) {
            Ok(0) => break Ok(()),
            Ok(n) => n,
            Err(source) => {
                break Err(BackendError::Io {
                    context: format!("reading {}", file.display()),
                    source,
                })
            }
        };
        let mut chunk = &buf[..n];
        while !chunk.is_empty() {
            match stream.send(chunk) {
                Ok(k) if k > 0 => chunk = &chunk[k as usize..],
                Ok(_) => break,
                Err(e) => return Err(storage_error(uri, "virStreamSend", &e)),
            }
        }
        sent += n as u64;
        let percent = sent * 100 / size.max(1);
        if percent >= next_report && percent < 100 {
            eprintln!("agentvm:   {kind} to {uri}: {percent}%");
            next_report = (percent / 25 + 1) * 25;
        }
    };
    if let Err(e) = result {
        let _ = stream.abort();
        return Err(e);
    }
    stream
        .finish()
        .map_err(|e| storage_error(uri, "virStreamFinish", &e))?;
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "agentvm:   {kind} to {uri}: done in {secs:.1} s ({:.0} MiB/s)",
        mib / secs.max(1e-3)
    );
    tracing::info!(
        uri,
        kind,
        bytes = size,
        seconds = secs,
        "image file uploaded"
    );
    Ok(())
}

/// Creates the per-VM state disk (qcow2 of `mib` MiB) in the pool; returns
/// its remote path (blocking).
pub fn create_state_volume(
    pool: &StoragePool,
    uri: &str,
    name: &str,
    mib: u64,
) -> Result<String, BackendError> {
    // A leftover of the same name (a swept domain of this process id) goes first.
    if let Ok(old) = pool.lookup_storage_vol_by_name(name) {
        let _ = old.delete(0);
    }
    let vol = StorageVol::create_xml(pool, &volume_xml(name, "qcow2", mib), 0)
        .map_err(|e| storage_error(uri, "creating the state disk (virStorageVolCreateXML)", &e))?;
    vol.path()
        .map_err(|e| storage_error(uri, "virStorageVolGetPath", &e))
}

/// Deletes a volume of agentvm's pool if it exists (blocking).
pub fn delete_volume(c: &Connect, name: &str) -> Result<(), VirtError> {
    let pool = match c.lookup_storage_pool_by_name(STORAGE_POOL) {
        Ok(p) => p,
        Err(e) if is_code(&e, ErrorNumber::NoStoragePool) => return Ok(()),
        Err(e) => return Err(e),
    };
    match pool.lookup_storage_vol_by_name(name) {
        Ok(v) => v.delete(0),
        Err(e) if is_code(&e, ErrorNumber::NoStorageVolume) => Ok(()),
        Err(e) => Err(e),
    }
}

/// The state disk volume of domain `domain`.
pub fn state_volume_name(domain: &str) -> String {
    format!("{domain}-state.qcow2")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_xml() {
        let hash = "0123456789abcdef0123456789abcdef";
        assert_eq!(
            volume_name(hash, "kernel"),
            "agentvm-0123456789abcdef-kernel"
        );
        assert_eq!(
            state_volume_name("agentvm-12-3"),
            "agentvm-12-3-state.qcow2"
        );
        let xml = volume_xml("agentvm-x-kernel", "raw", 0);
        assert!(xml.contains("<name>agentvm-x-kernel</name>"), "{xml}");
        assert!(xml.contains("<capacity unit='MiB'>0</capacity>"), "{xml}");
        assert!(xml.contains("<format type='raw'/>"), "{xml}");
        let pool = pool_xml("/var/lib/libvirt/agentvm");
        assert!(pool.starts_with("<pool type='dir'>"), "{pool}");
        assert!(
            pool.contains("<name>agentvm</name>")
                && pool.contains("<path>/var/lib/libvirt/agentvm</path>"),
            "{pool}"
        );
    }

    #[test]
    fn volume_checks() {
        assert_eq!(check_volume(None, 10), VolumeCheck::Missing);
        assert_eq!(check_volume(Some(10), 10), VolumeCheck::Complete);
        assert_eq!(check_volume(Some(4), 10), VolumeCheck::Partial);
        assert_eq!(check_volume(Some(0), 10), VolumeCheck::Partial);
    }

    #[test]
    fn file_hash_is_sha256_and_follows_changes() {
        let dir = std::env::temp_dir().join(format!("agentvm-upload-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("f");
        std::fs::write(&f, b"abc").unwrap();
        assert_eq!(
            file_sha256(&f).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        std::fs::write(&f, b"abcd").unwrap();
        assert_eq!(
            file_sha256(&f).unwrap(),
            "88d4266fd4e6338d13b845fcf289579d209c897823b9217da3e161936f031589"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
