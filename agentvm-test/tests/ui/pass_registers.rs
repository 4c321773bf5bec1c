// Every supported form compiles and registers a test with the given settings.
use std::time::Duration;

use agentvm_test::registry::{all_tests, TestResult, TESTS};
use agentvm_test::{agent_vm_test, Vm};

#[agent_vm_test(
    timeout = "1m30s",
    profile = "light",
    image = "default",
    network = "bridge:br0",
    memory_mib = 512,
    vcpus = 2,
    ignore = "needs network",
    fixtures("Cargo.toml"),
)]
async fn configured(vm: &mut Vm) -> TestResult {
    let _vm: &mut Vm = vm;
    Ok(())
}

#[agent_vm_test]
async fn returns_unit(_vm: &mut Vm) {}

#[agent_vm_test(ignore, network = "nat-filtered")]
async fn returns_io_result(_vm: &mut Vm) -> Result<(), std::io::Error> {
    std::fs::metadata("/")?;
    Ok(())
}

mod nested {
    #[agentvm_test::agent_vm_test(timeout = "500ms", profile = "minimal")]
    pub async fn in_a_module(_: &mut agentvm_test::Vm) -> agentvm_test::registry::TestResult<String> {
        Err("failed on purpose".to_owned())
    }
}

// The function is kept as written and can still be called directly.
#[allow(dead_code)]
fn uses_the_function(vm: &mut Vm) {
    let _future = returns_unit(vm);
}

fn main() {
    let names: Vec<String> = all_tests().map(|t| t.full_name()).collect();
    assert_eq!(
        names,
        ["configured", "nested::in_a_module", "returns_io_result", "returns_unit"]
    );
    assert_eq!(TESTS.len(), 4);

    let configured = all_tests().find(|t| t.name == "configured").unwrap();
    let c = &configured.config;
    assert_eq!(c.timeout, Some(Duration::from_secs(90)));
    assert_eq!(c.profile, Some("light"));
    assert_eq!(c.image, Some("default"));
    assert_eq!(c.network, Some("bridge:br0"));
    assert_eq!(c.memory_mib, Some(512));
    assert_eq!(c.vcpus, Some(2));
    assert_eq!(c.ignore, Some(Some("needs network")));
    assert_eq!(c.fixtures.len(), 1);
    let fixture = std::path::Path::new(c.fixtures[0]);
    assert!(fixture.is_absolute() && fixture.is_file(), "{fixture:?}");
    assert!(configured.file.ends_with("pass_registers.rs"), "{}", configured.file);
    assert_eq!(configured.line, 17, "the line of the function's name");
    assert!(configured.is_ignored());

    let unit = all_tests().find(|t| t.name == "returns_unit").unwrap();
    assert_eq!(unit.config, agentvm_test::registry::TestConfig::DEFAULT);
    assert_eq!(unit.line, 23);

    let io = all_tests().find(|t| t.name == "returns_io_result").unwrap();
    assert_eq!(io.config.ignore, Some(None));
    assert_eq!(io.config.network, Some("nat-filtered"));

    let nested = all_tests().find(|t| t.name == "in_a_module").unwrap();
    assert!(nested.module_path.ends_with("::nested"), "{}", nested.module_path);
    assert_eq!(nested.config.timeout, Some(Duration::from_millis(500)));
    assert_eq!(nested.config.profile, Some("minimal"));
    assert!(!nested.is_ignored());
}
