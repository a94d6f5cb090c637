//! The docker-compose and Istio files pass their checks (`tests/deploy/*.py`: they parse,
//! reference files that exist, and their Envoy and Sluice configuration validates in real
//! Envoy); no Docker engine or cluster is needed. Every plain Envoy configuration is
//! validated by `config::every_envoy_yaml_passes_envoy_validate`.

use crate::harness::*;
use std::process::Command;

fn run_check(script: &str) {
    let out = Command::new(python_bin())
        .arg(repo_root().join(script))
        .env("SLUICE_ENVOY", envoy_bin())
        .env("SLUICE_WASM", wasm_path())
        .env("SLUICE_RELAY", relay_path())
        .current_dir(repo_root())
        .output()
        .unwrap();
    let log =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{script} failed:\n{log}");
}

#[test]
fn docker_compose_files_check() {
    run_check("tests/deploy/check_compose.py");
}

#[test]
fn istio_manifests_and_wasm_image_check() {
    run_check("tests/deploy/check_istio.py");
}
