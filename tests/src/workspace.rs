//! The repository around the tests: its root, and the Node.js packages some tests run.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Once;

/// The workspace root, for tests that read the repository's files or run its scripts.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// tests/browser's npm packages, installed by `scripts/browser-setup` (with the services, the
/// tools and the Python reference library it sees to) once per test process: a binary's tests
/// run at once, and two `npm ci` in one folder would undo each other. Returns their
/// `node_modules`, for `NODE_PATH`.
pub fn node_packages() -> PathBuf {
    static SETUP: Once = Once::new();
    SETUP.call_once(|| {
        let setup = Command::new(root().join("scripts/browser-setup"))
            .status()
            .expect("scripts/browser-setup runs");
        assert!(setup.success(), "scripts/browser-setup failed");
    });
    root().join("tests/browser/node_modules")
}
