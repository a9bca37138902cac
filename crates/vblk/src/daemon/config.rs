//! The `--config` file: TOML, the daemon's settings and a list of exports.
//!
//! ```toml
//! control = "/run/vblk/control.sock"   # optional; --control wins
//! metrics = "127.0.0.1:9184"           # optional; --metrics wins
//!
//! [[export]]
//! name = "vm1"                         # default: the image file's stem
//! image = "/var/lib/vblk/vm1.qcow2"
//! socket = "/run/vblk/vm1.sock"
//! format = "qcow2"
//! num_queues = 4
//! ```
//! An export table takes every option `vblk serve` takes for one disk, by its long name
//! (`num_queues` or `num-queues`); flags are `true`/`false`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::{Map, Value};

use super::options::{resolve_paths, ExportArgs};

/// A parsed config file.
#[derive(Debug, Default)]
pub struct Config {
    pub control: Option<PathBuf>,
    pub metrics: Option<String>,
    /// Each export's options, parsed, with the table as written (for `export_list`).
    pub exports: Vec<(ExportArgs, Map<String, Value>)>,
}

impl Config {
    pub fn load(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read config {}", path.display()))?;
        let dir = std::fs::canonicalize(path)?.parent().map(Path::to_path_buf).unwrap_or_default();
        Config::parse(&text, &dir).with_context(|| format!("config {}", path.display()))
    }

    /// Parse a config; relative paths in it are relative to `dir` (the file's directory).
    pub fn parse(text: &str, dir: &Path) -> Result<Config> {
        let table: toml::Table = toml::from_str(text).map_err(|e| anyhow::anyhow!("{}", e.to_string().trim_end()))?;
        let mut config = Config::default();
        for (key, value) in table {
            match (key.as_str(), value) {
                ("control", toml::Value::String(s)) => config.control = Some(dir.join(s)),
                ("metrics", toml::Value::String(s)) => config.metrics = Some(s),
                ("export", toml::Value::Array(exports)) => {
                    for (i, e) in exports.into_iter().enumerate() {
                        let Value::Object(mut obj) = serde_json::to_value(&e)? else {
                            bail!("export #{}: not a table", i + 1);
                        };
                        let which = match obj.get("name") {
                            Some(Value::String(n)) => format!("export '{n}'"),
                            _ => format!("export #{}", i + 1),
                        };
                        resolve_paths(&mut obj, Some(dir))?;
                        let args = ExportArgs::from_object(&obj).with_context(|| which)?;
                        config.exports.push((args, obj));
                    }
                }
                ("control" | "metrics", _) => bail!("'{key}' must be a string"),
                ("export", _) => bail!("'export' must be an array of tables ([[export]])"),
                _ => bail!("unknown setting '{key}' (known: control, metrics, [[export]])"),
            }
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_config_with_two_exports() {
        let c = Config::parse(
            "control = \"/run/c.sock\"\n[[export]]\nname = \"a\"\nimage = \"a.img\"\nsocket = \"/a.sock\"\nnum_queues = 2\n\
             [[export]]\nimage = \"/b.qcow2\"\nsocket = \"/b.sock\"\nformat = \"qcow2\"\nreadonly = true\n",
            Path::new("/etc/vblk"),
        )
        .unwrap();
        assert_eq!(c.exports[0].0.image.as_deref(), Some(Path::new("/etc/vblk/a.img")), "relative to the file");
        assert_eq!(c.control, Some(PathBuf::from("/run/c.sock")));
        assert_eq!(c.exports.len(), 2);
        assert_eq!(c.exports[0].0.export_name().unwrap(), "a");
        assert_eq!(c.exports[1].0.export_name().unwrap(), "b");
        assert!(c.exports[1].0.readonly);
    }

    #[test]
    fn config_errors_say_where() {
        let e = |t: &str| format!("{:#}", Config::parse(t, Path::new("/")).unwrap_err());
        assert_eq!(e("[[export]]\nname = \"a\"\nimage = \"x\"\nqueue = 3\n"), "export 'a': unknown option 'queue'");
        assert_eq!(e("[[export]]\nname = \"a\"\nimage = \"x\"\n"), "export 'a': an export needs a socket");
        assert_eq!(e("[[export]]\nsocket = \"s\"\n"), "export #1: an export needs an image");
        assert!(e("contrl = \"x\"").starts_with("unknown setting 'contrl'"));
        assert!(e("[[export]\n").contains("line 1"), "{}", e("[[export]\n"));
    }
}
