//! Configuration in real Envoy: every YAML in `envoy/` validates, and an invalid Sluice
//! configuration makes Envoy refuse to start, with a log line naming the field.

use crate::harness::*;
use std::process::Command;

/// Every Envoy YAML in the repo, relative to the root.
fn envoy_yamls() -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut dirs = vec![repo_root().join("envoy")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml")
                && std::fs::read_to_string(&path)
                    .unwrap()
                    .contains("static_resources")
            {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

#[test]
fn every_envoy_yaml_passes_envoy_validate() {
    let yamls = envoy_yamls();
    for expected in [
        "envoy/demo.yaml",
        "envoy/production.yaml",
        "envoy/compose/envoy.yaml",
    ] {
        assert!(
            yamls.contains(&repo_root().join(expected)),
            "{expected} not found among {yamls:?}"
        );
    }
    let wasm = wasm_path();
    let relay = relay_path();
    for yaml in yamls {
        // Validation loads the real wasm and runs its configure step.
        let dir = unique_dir();
        // This build's wasm wherever the file expects it (demo, production, compose), and
        // the access log (which validation opens) in a scratch directory.
        let mut text = String::new();
        for line in std::fs::read_to_string(&yaml).unwrap().lines() {
            let trimmed = line.trim_start();
            let indent = &line[..line.len() - trimmed.len()];
            if trimmed.starts_with("local: { filename:") && trimmed.contains("sluice.wasm") {
                text += &format!("{indent}local: {{ filename: {} }}\n", wasm.display());
            } else if trimmed.starts_with("module: { local: { filename:")
                && trimmed.contains("libsluice_relay.so")
            {
                text += &format!(
                    "{indent}module: {{ local: {{ filename: {} }} }}\n",
                    relay.display()
                );
            } else if trimmed.starts_with("path: ") && trimmed.ends_with(".log") {
                text += &format!("{indent}path: {}\n", dir.join("access.log").display());
            } else {
                text += line;
                text.push('\n');
            }
        }
        assert!(
            text.contains(&format!("filename: {}", wasm.display())),
            "{}: no sluice.wasm to load",
            yaml.display()
        );
        // Every shipped gateway carries the stream relay right after Sluice.
        assert!(
            text.contains(&format!("filename: {} }}", relay.display())),
            "{}: no stream relay (libsluice_relay.so) after Sluice",
            yaml.display()
        );
        let path = dir.join("validate.yaml");
        std::fs::write(&path, text).unwrap();
        let out = Command::new(envoy_bin())
            .args(["--mode", "validate", "-c"])
            .arg(&path)
            .envs(provider_env())
            .current_dir(repo_root())
            .output()
            .unwrap();
        let log = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "{} failed validation:\n{log}",
            yaml.display()
        );
        assert!(log.contains("OK"), "{}: {log}", yaml.display());
        std::fs::remove_dir_all(dir).ok();
    }
}

/// Starts Envoy with an edited demo config and returns its log, asserting it refused.
async fn refused_with(edit: ConfigEdit) -> String {
    let mocks = Mocks::start().await;
    let dir = unique_dir();
    let yaml = render_demo_config(&mocks, &dir, Some(edit));
    let path = dir.join("envoy.yaml");
    std::fs::write(&path, yaml).unwrap();
    match spawn_envoy(&path, &dir, 2) {
        Ok((mut child, _)) => {
            let _ = child.kill();
            panic!("Envoy accepted an invalid Sluice configuration");
        }
        Err(log) => log,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_field_is_refused_and_named() {
    let log = refused_with(Box::new(|v| v["providers"][0]["clustr"] = "openai".into())).await;
    assert!(log.contains("invalid sluice configuration"), "{log}");
    assert!(
        log.contains("clustr"),
        "the log should name the field:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_value_is_refused_and_named() {
    let log = refused_with(Box::new(|v| v["tenants"][1]["tier"] = "platinum".into())).await;
    assert!(log.contains("tenants[1].tier"), "{log}");
    assert!(log.contains("platinum"), "{log}");
}

#[test]
fn demo_config_holds_only_key_digests() {
    let yaml = std::fs::read_to_string(repo_root().join("envoy/demo.yaml")).unwrap();
    for key in [ACME, GLOBEX, INITECH] {
        assert!(
            !yaml.contains(key),
            "a plain tenant key is in envoy/demo.yaml"
        );
        assert!(
            yaml.contains(&sluice::auth::sha256_hex(key)),
            "digest of {key} missing"
        );
    }
    for secret in ["sk-mock-", OPENAI_KEY] {
        assert!(
            !yaml.contains(secret),
            "a provider key is inline in envoy/demo.yaml"
        );
    }
    for needle in [
        "FAIL_CLOSED",
        "allow_on_headers_stop_iteration: true",
        "specifier_name: chain",
        "refresh_cluster_on_retry: true",
        "root_id: sluice_upstream",
    ] {
        assert!(
            yaml.contains(needle),
            "{needle} missing from the demo config"
        );
    }
}

/// The `local_reply_config` block of a YAML file, dedented (None if absent).
fn local_reply_block(path: &str) -> Option<String> {
    let text = std::fs::read_to_string(repo_root().join(path)).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let at = lines
        .iter()
        .position(|l| l.trim() == "local_reply_config:")?;
    let indent = lines[at].len() - lines[at].trim_start().len();
    let block: Vec<&str> = std::iter::once(lines[at])
        .chain(
            lines[at + 1..]
                .iter()
                .take_while(|l| l.len() - l.trim_start().len() > indent)
                .copied(),
        )
        .map(|l| &l[indent..])
        .collect();
    Some(block.join("\n"))
}

/// The demo's mapping of Envoy's own errors to JSON is tested live; the other shipped
/// configurations must carry the same one (compose is generated from the demo).
#[test]
fn every_shipped_config_answers_envoys_own_errors_like_the_demo() {
    let demo = local_reply_block("envoy/demo.yaml").expect("demo.yaml has local_reply_config");
    for other in [
        "envoy/production.yaml",
        "envoy/compose/envoy.yaml",
        "envoy/istio/20-sluice-envoyfilter.yaml",
    ] {
        assert_eq!(
            local_reply_block(other).as_deref(),
            Some(demo.as_str()),
            "{other}: local_reply_config differs from envoy/demo.yaml"
        );
    }
}
