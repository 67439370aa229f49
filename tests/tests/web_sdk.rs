//! The web SDK (sdk/web): `npm ci` then `npm test` there, which checks the
//! committed browser bundle is fresh, runs the codec tests against the shared
//! frame vectors (proto/testdata/frames.json), and drives the SDK in Debian's
//! headless Chromium against a real `pushgrid dev` (this build's binary). A
//! missing node, npm or chromium fails the test: nothing is skipped.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;

use pushgrid_e2e::binary;

fn have(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .output()
        .map(|output| output.status.success())
        .unwrap_or(false)
}

fn npm(sdk: &Path, args: &[&str], pushgrid: &Path) {
    let output = Command::new("npm")
        .args(args)
        .current_dir(sdk)
        .env("PUSHGRID_BIN", pushgrid)
        .env("CHROMIUM", "/usr/bin/chromium")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "npm {} failed in {}:\n{stdout}\n{stderr}",
        args.join(" "),
        sdk.display()
    );
    if args == ["test"] {
        println!("{stdout}");
        assert!(
            stdout.contains("# fail 0") && stdout.contains("# skipped 0"),
            "{stdout}"
        );
    }
}

#[test]
fn the_web_sdk_passes_its_tests_in_headless_chromium() {
    assert!(
        have("node") && have("npm"),
        "node and npm are needed for the web SDK's tests (apt-get install -y nodejs npm; .ci/run installs them)"
    );
    assert!(
        Path::new("/usr/bin/chromium").exists(),
        "/usr/bin/chromium is missing (apt-get install -y chromium; .ci/run installs it)"
    );
    let sdk = Path::new(env!("CARGO_MANIFEST_DIR")).join("../sdk/web");
    let pushgrid = binary("pushgrid");
    npm(&sdk, &["ci", "--no-audit", "--no-fund"], &pushgrid);
    npm(&sdk, &["test"], &pushgrid);
}
