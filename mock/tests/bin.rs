//! Tests of the `sluice-mock` binary.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_sluice-mock");

#[test]
fn bad_args_exit_2() {
    for args in [
        vec![],
        vec!["--provider"],
        vec!["--provider", "a,openai,127.0.0.1:0,/v1"],
        vec!["--provider", "a,nope,127.0.0.1:0,/v1,K"],
        vec!["--provider", "a,openai,not-an-addr,/v1,K"],
        vec!["--bogus"],
    ] {
        let out = Command::new(BIN).args(&args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("usage:"));
    }
}

#[test]
fn missing_key_env_is_a_clear_error() {
    let out = Command::new(BIN)
        .args([
            "--provider",
            "openai,openai,127.0.0.1:0,/v1,SLUICE_MOCK_TEST_UNSET_KEY",
        ])
        .env_remove("SLUICE_MOCK_TEST_UNSET_KEY")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("SLUICE_MOCK_TEST_UNSET_KEY"));
}

#[test]
fn serves_logs_and_exits_on_sigterm() {
    let secret = "sk-binary-test-secret-9876";
    let mut child = Command::new(BIN)
        .args([
            "--provider",
            "openai,openai,127.0.0.1:0,/v1,SLUICE_MOCK_TEST_KEY",
            "--provider",
            "deepseek,openai,127.0.0.1:0,,SLUICE_MOCK_TEST_KEY",
        ])
        .env("SLUICE_MOCK_TEST_KEY", secret)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut addrs = Vec::new();
    for _ in 0..2 {
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        assert!(line.starts_with("sluice-mock: "), "{line}");
        assert!(line.contains("(openai) listening on 127.0.0.1:"), "{line}");
        addrs.push(line.trim().rsplit(' ').next().unwrap().to_string());
    }
    // One request with the right key, over a raw socket.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let r = reqwest::Client::new()
            .post(format!("http://{}/v1/chat/completions", addrs[0]))
            .bearer_auth(secret)
            .json(&serde_json::json!({"model":"m","messages":[{"role":"user","content":"hi"}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    });
    let pid = child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let deadline = Instant::now() + Duration::from_secs(5);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "did not exit on SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success());
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(
        stderr.contains("openai POST /v1/chat/completions -> 200"),
        "{stderr}"
    );
    assert!(!stderr.contains(secret));
}
