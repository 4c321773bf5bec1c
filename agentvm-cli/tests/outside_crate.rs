//! A user's own crate, outside this repository, as a user would drive it:
//! its tests fail while the image is missing, with a message naming the
//! exact command (output directory included); that command, run with the
//! `agentvm` CLI built here, builds the image for real; then its tests pass
//! in a real VM booted from that image.
//!
//! Ignored by a plain `cargo test` (it builds an image and a second crate);
//! `cargo xtask test` runs it with `--ignored`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Instant;

/// The agentvm checkout.
fn checkout() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("agentvm-cli lives in the workspace")
        .to_path_buf()
}

/// The workspace's target directory (that of the `agentvm` binary under
/// test), reused by the user crate so that it compiles only itself.
fn target_dir() -> PathBuf {
    let bin = Path::new(env!("CARGO_BIN_EXE_agentvm"));
    bin.ancestors()
        .nth(2)
        .expect("the binary is in <target>/<profile>/")
        .to_path_buf()
}

const USER_TEST: &str = r#"use agentvm_test::prelude::*;

#[agent_vm_test(timeout = "60s")]
async fn runs_in_a_vm_from_my_image(vm: &mut Vm) -> TestResult {
    let out = vm.sh("uname -s; cat /etc/agentvm/image").await?;
    assert!(out.stdout.starts_with("Linux\n"), "{out:?}");
    let key = std::env::var("EXPECTED_IMAGE_KEY").expect("set by the outer test");
    assert!(out.stdout.contains(&format!("key={key}\n")), "{out:?}");
    Ok(())
}

agentvm_test::main!();
"#;

/// Writes the user crate into `dir`: a package depending on agentvm-test
/// by path, one test, and `.config/agentvm.toml` with its own image dir.
fn write_user_crate(dir: &Path) {
    let agentvm_test = checkout().join("agentvm-test");
    std::fs::write(
        dir.join("Cargo.toml"),
        format!(
            "[package]\nname = \"my-agent-tests\"\nversion = \"0.1.0\"\nedition = \"2021\"\n\
             publish = false\n\n[workspace]\n\n\
             [dev-dependencies]\nagentvm-test = {{ path = {:?} }}\n\n\
             [[test]]\nname = \"vm\"\nharness = false\n",
            agentvm_test.display().to_string()
        ),
    )
    .unwrap();
    std::fs::create_dir_all(dir.join("src")).unwrap();
    std::fs::write(dir.join("src/lib.rs"), "").unwrap();
    std::fs::create_dir_all(dir.join("tests")).unwrap();
    std::fs::write(dir.join("tests/vm.rs"), USER_TEST).unwrap();
    std::fs::create_dir_all(dir.join(".config")).unwrap();
    std::fs::write(
        dir.join(".config/agentvm.toml"),
        "image_dir = \"vm-images\"\n[pool]\nmin_size = 1\nmax_size = 1\n",
    )
    .unwrap();
    // The same dependency versions as the workspace, so that the shared
    // target directory already has them built.
    std::fs::copy(checkout().join("Cargo.lock"), dir.join("Cargo.lock")).unwrap();
}

/// A command as from the user's shell in `dir`: none of the outer cargo's
/// or agentvm's variables.
fn user_command(program: impl AsRef<std::ffi::OsStr>, dir: &Path) -> Command {
    let mut command = Command::new(program);
    command.current_dir(dir);
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy().into_owned();
        // CARGO_HOME and the like stay: the user's cargo set-up.
        let outer_cargo = [
            "CARGO_PKG_",
            "CARGO_BIN_",
            "CARGO_MANIFEST_",
            "CARGO_CRATE_",
        ]
        .iter()
        .any(|p| key.starts_with(p))
            || [
                "CARGO_PRIMARY_PACKAGE",
                "CARGO_TARGET_TMPDIR",
                "CARGO_TARGET_DIR",
            ]
            .contains(&key.as_str());
        if outer_cargo || key.starts_with("AGENT_VM_") || key.starts_with("AGENTVM_") {
            command.env_remove(&key);
        }
    }
    command
}

fn cargo_test(dir: &Path, image_key: &str) -> Output {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    user_command(cargo, dir)
        .args(["test", "--test", "vm"])
        .env("CARGO_TARGET_DIR", target_dir())
        .env("EXPECTED_IMAGE_KEY", image_key)
        .output()
        .unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "status: {}\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The first backquoted command in `text` that starts with `prefix`.
fn quoted_command<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
    let start = text.find(&format!("`{prefix}"))? + 1;
    let len = text[start..].find('`')?;
    Some(&text[start..start + len])
}

fn manifest_key(image_dir: &Path) -> String {
    let manifest = std::fs::read_to_string(image_dir.join("manifest.json")).unwrap();
    let value: serde_json::Value = serde_json::from_str(&manifest).unwrap();
    value["key"].as_str().unwrap().to_string()
}

#[test]
#[ignore = "builds a guest image and a crate outside the repository (~1-2 min): `cargo xtask test` runs it"]
fn a_crate_outside_the_repository_is_told_how_to_build_its_image_and_then_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().canonicalize().unwrap();
    assert!(
        !dir.starts_with(checkout()),
        "the user crate must be outside the repository"
    );
    write_user_crate(&dir);
    let images = dir.join("vm-images");

    // 1. No image: the test fails, naming the command for this image dir.
    let started = Instant::now();
    let out = cargo_test(&dir, "unused");
    let first = text(&out);
    eprintln!(
        "user crate's cargo test, image missing: {:.1}s",
        started.elapsed().as_secs_f64()
    );
    assert!(!out.status.success(), "{first}");
    assert!(
        first.contains(&format!(
            "guest image \"default\" not found at {}",
            images.join("default").join("manifest.json").display()
        )),
        "{first}"
    );
    let hint = quoted_command(&first, "agentvm image build").expect("the hint names the command");
    assert_eq!(
        hint,
        format!("agentvm image build --out {}", images.display()),
        "{first}"
    );
    assert!(
        first.contains(&format!(
            "cargo install --path {}",
            checkout().join("agentvm-cli").display()
        )),
        "{first}"
    );
    // Outside the repository there is no `cargo xtask` to run.
    assert!(!first.contains("cargo xtask"), "{first}");

    // 2. The hint's command, with the CLI built from this workspace.
    let started = Instant::now();
    let mut words = hint.split_whitespace();
    assert_eq!(words.next(), Some("agentvm"));
    let out = user_command(env!("CARGO_BIN_EXE_agentvm"), &dir)
        .args(words)
        .output()
        .unwrap();
    let build = text(&out);
    eprintln!(
        "agentvm image build: {:.1}s",
        started.elapsed().as_secs_f64()
    );
    assert!(out.status.success(), "{build}");
    assert!(build.contains("image default built in"), "{build}");
    let key = manifest_key(&images.join("default"));
    for file in ["vmlinuz", "initramfs.cpio.gz"] {
        assert!(images.join("default").join(file).is_file(), "{file}");
    }

    // 3. Now the user's tests pass, in a VM booted from that image.
    let started = Instant::now();
    let out = cargo_test(&dir, &key);
    let second = text(&out);
    eprintln!(
        "user crate's cargo test, image built: {:.1}s",
        started.elapsed().as_secs_f64()
    );
    assert!(out.status.success(), "{second}");
    assert!(
        second.contains("runs_in_a_vm_from_my_image") && second.contains("1 passed"),
        "{second}"
    );
}
