//! A real Prometheus on 127.0.0.1, scraping memprof, with memprof's alerting rules.

use std::{fs, path::Path, process::Command, time::Duration};

use serde_json::Value;

use super::{
    REPO, TempDir,
    http::{free_port, http_get, poll, url_encode},
};
use crate::common::{Proc, tool};

pub(crate) struct Prometheus {
    pub(crate) proc: Proc,
    pub(crate) port: u16,
    pub(crate) _dir: TempDir,
}

impl Prometheus {
    /// A Prometheus on 127.0.0.1 scraping `target_port` every second, with memprof's rules.
    pub(crate) fn start(target_port: u16) -> Prometheus {
        Self::start_with(target_port, None)
    }

    /// [`Prometheus::start`], sending the bearer token of `token_file` when it is given.
    pub(crate) fn start_with(target_port: u16, token_file: Option<&Path>) -> Prometheus {
        let dir = TempDir::new("prometheus");
        let rules = Path::new(REPO).join("deploy/prometheus/memprof-rules.yml");
        let config = dir.0.join("prometheus.yml");
        fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
                 rule_files:\n  - {}\n\
                 scrape_configs:\n  - job_name: memprof\n    static_configs:\n      - targets: \
                 ['127.0.0.1:{target_port}']\n{}",
                rules.display(),
                token_file.map_or(String::new(), |f| format!(
                    "    authorization:\n      credentials_file: {}\n",
                    f.display()
                ))
            ),
        )
        .unwrap();
        let port = free_port();
        let mut cmd = Command::new(tool("PROMETHEUS", "prometheus"));
        cmd.arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.0.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .current_dir(&dir.0);
        let proc = Proc::spawn("prometheus", &mut cmd);
        let p = Prometheus {
            proc,
            port,
            _dir: dir,
        };
        let ready = poll(Duration::from_secs(30), || {
            http_get(port, "/-/ready").ok().filter(|r| r.status == 200)
        });
        assert!(
            ready.is_some(),
            "prometheus not ready within 30 s\n{}",
            p.proc.output_tail()
        );
        p
    }

    pub(crate) fn api(&self, path: &str) -> Value {
        let r = http_get(self.port, path).unwrap_or_else(|e| {
            panic!(
                "GET {path} from prometheus: {e}\n{}",
                self.proc.output_tail()
            )
        });
        let v: Value = serde_json::from_str(&r.body)
            .unwrap_or_else(|e| panic!("GET {path}: not JSON ({e}): {}", r.body));
        assert_eq!(v["status"], "success", "GET {path}: {v}");
        v["data"].clone()
    }

    /// The instant vector for `query`.
    pub(crate) fn query(&self, query: &str) -> Vec<Value> {
        self.api(&format!("/api/v1/query?query={}", url_encode(query)))["result"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// The one sample's value of `query`, as Prometheus prints it.
    pub(crate) fn value(&self, query: &str) -> String {
        let result = self.query(query);
        assert_eq!(
            result.len(),
            1,
            "{query}: expected one series, got {result:?}"
        );
        result[0]["value"][1].as_str().unwrap().to_string()
    }
}
