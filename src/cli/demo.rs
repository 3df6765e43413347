//! `warden demo`: see `crate::demo`.

use std::path::PathBuf;

pub fn run(store: Option<PathBuf>) -> anyhow::Result<()> {
    // The demo prints its own story; only errors are logged beside it.
    super::init_logging("error");
    let temporary = store.is_none();
    let store = store.unwrap_or_else(|| {
        std::env::temp_dir()
            .join(format!("warden-demo-{}", std::process::id()))
            .join("warden.duckdb")
    });
    if temporary {
        let _ = std::fs::remove_file(&store);
    }
    let result = super::runtime()?.block_on(async {
        let mut stdout = std::io::stdout();
        crate::demo::run(store.clone(), &mut stdout).await
    });
    if temporary && let Some(dir) = store.parent() {
        let _ = std::fs::remove_dir_all(dir);
    }
    result?;
    Ok(())
}
