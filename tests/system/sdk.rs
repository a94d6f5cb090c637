//! The official OpenAI and Anthropic Python SDKs, pointed at the gateway, get answers
//! and raise the right exception types for gateway errors.

use crate::harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn official_sdks_work_through_the_gateway() {
    let gw = Gateway::start().await;
    let python = python_bin();
    let script = repo_root().join("tests/sdk/check_sdks.py");
    let base = format!("http://{}", gw.addr);
    let out = tokio::process::Command::new(python)
        .arg(script)
        .env("SLUICE_BASE", &base)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(std::time::Duration::from_secs(120), out)
        .await
        .expect("SDK checks timed out")
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "SDK checks failed (is the SDK installed? `make sdk`):\n{stdout}\n{stderr}\nenvoy log:\n{}",
        gw.log()
    );
    assert!(stdout.contains("SDK checks passed"), "{stdout}");
    let providers: std::collections::BTreeSet<String> =
        gw.mocks.all().into_iter().map(|r| r.provider).collect();
    assert_eq!(
        providers.len(),
        4,
        "the SDK calls should reach all four providers: {providers:?}"
    );
    assert_never_sent(&gw.mocks.all(), ACME);
    // The SDK's organization and project headers never reach a provider.
    for r in gw.mocks.all() {
        let names: Vec<&str> = r.headers.iter().map(|(n, _)| n.as_str()).collect();
        assert!(
            !names.contains(&"openai-organization") && !names.contains(&"openai-project"),
            "{} got {names:?}",
            r.provider
        );
    }
    assert!(
        gw.mocks
            .anthropic
            .requests()
            .iter()
            .any(|r| r.path == "/v1/messages/count_tokens"),
        "count_tokens is forwarded to the provider"
    );
}
