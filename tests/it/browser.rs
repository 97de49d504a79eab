//! A real headless Chromium driven over WebDriver (Debian's `chromium` and
//! `chromium-driver`, installed with apt-get when missing), for the console's tests.
//! Each test gets its own chromedriver on a free port and a fresh profile, both removed
//! when the browser closes (or the test panics).

use std::{
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use fantoccini::{Client, ClientBuilder, Locator, elements::Element};
use serde_json::json;
use thena_testkit::wait_until;

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
/// How long a page may take to show what a test waits for.
pub const PAGE: Duration = Duration::from_secs(15);

/// Installs Chromium and its driver once per machine (concurrent tests wait on a lock).
fn ensure_installed() {
    if Path::new(CHROMIUM).exists() && Path::new(CHROMEDRIVER).exists() {
        return;
    }
    let lock = std::fs::File::create(std::env::temp_dir().join("thena-console-apt.lock"))
        .expect("apt lock file");
    lock.lock().expect("apt lock");
    if Path::new(CHROMIUM).exists() && Path::new(CHROMEDRIVER).exists() {
        return;
    }
    eprintln!("installing chromium and chromium-driver with apt-get (once)");
    let install = || {
        Command::new("apt-get")
            .args([
                "install",
                "-y",
                "--no-install-recommends",
                "chromium",
                "chromium-driver",
            ])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .is_ok_and(|s| s.success())
    };
    if !install() {
        let updated = Command::new("apt-get").arg("update").status();
        assert!(
            updated.is_ok_and(|s| s.success()) && install(),
            "the console's browser tests need Debian's chromium and chromium-driver: \
             apt-get install chromium chromium-driver"
        );
    }
}

/// The directory the console's screenshots go to.
pub fn screenshots_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("target/console-screenshots")
}

pub struct Browser {
    pub client: Client,
    driver: Child,
    profile: PathBuf,
}

impl Browser {
    /// A headless Chromium with a laptop-sized window.
    pub async fn start() -> Browser {
        ensure_installed();
        let profile = std::env::temp_dir().join(format!(
            "thena-console-chrome-{}",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&profile).expect("profile dir");
        // A port that was free a moment ago may be taken by the time chromedriver binds
        // it: then it exits, and another port is tried.
        for _ in 0..5 {
            let port = free_port();
            let mut driver = Command::new(CHROMEDRIVER)
                .arg(format!("--port={port}"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start chromedriver");
            let url = format!("http://127.0.0.1:{port}");
            let up = wait_until("chromedriver answers", Duration::from_secs(10), || {
                let exited = matches!(driver.try_wait(), Ok(Some(_)));
                let status = format!("{url}/status");
                async move {
                    if exited {
                        return Some(false);
                    }
                    reqwest::get(status).await.ok().map(|_| true)
                }
            })
            .await;
            if !up {
                continue;
            }
            let client =
                ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
                    .capabilities(capabilities(&profile))
                    .connect(&url)
                    .await;
            match client {
                Ok(client) => {
                    return Browser {
                        client,
                        driver,
                        profile,
                    };
                }
                Err(e) => {
                    let _ = driver.kill();
                    panic!("chromium did not start under chromedriver: {e}");
                }
            }
        }
        panic!("chromedriver could not bind a free port in 5 tries");
    }

    pub async fn goto(&self, url: &str) {
        self.client.goto(url).await.expect("navigate");
    }

    pub async fn path(&self) -> String {
        let url = self.client.current_url().await.expect("current url");
        match url.query() {
            Some(q) => format!("{}?{q}", url.path()),
            None => url.path().to_owned(),
        }
    }

    /// Waits for an element matching `css`.
    pub async fn find(&self, css: &str) -> Element {
        self.client
            .wait()
            .at_most(PAGE)
            .for_element(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("no {css} on the page: {e}"))
    }

    /// The visible text of the first element matching `css`.
    pub async fn text(&self, css: &str) -> String {
        self.find(css).await.text().await.expect("text")
    }

    pub async fn fill(&self, css: &str, value: &str) {
        let field = self.find(css).await;
        field.clear().await.expect("clear");
        field.send_keys(value).await.expect("type");
    }

    pub async fn click(&self, css: &str) {
        self.find(css).await.click().await.expect("click");
    }

    /// Clicks a link or button by its visible text.
    pub async fn click_text(&self, text: &str) {
        let xpath = format!(
            "//*[self::a or self::button][normalize-space(.)={}]",
            xpath_literal(text)
        );
        self.client
            .wait()
            .at_most(PAGE)
            .for_element(Locator::XPath(&xpath))
            .await
            .unwrap_or_else(|e| panic!("no link or button {text:?}: {e}"))
            .click()
            .await
            .expect("click");
    }

    /// Waits until the page's text contains `needle`; returns the text.
    pub async fn wait_for_text(&self, needle: &str) -> String {
        let last = std::sync::Mutex::new(String::new());
        let waited = tokio::time::timeout(
            PAGE,
            wait_until(&format!("the page says {needle:?}"), PAGE * 2, || async {
                let body = self.client.find(Locator::Css("body")).await.ok()?;
                let text = body.text().await.ok()?;
                *last.lock().unwrap() = text.clone();
                text.contains(needle).then_some(text)
            }),
        )
        .await;
        waited.unwrap_or_else(|_| {
            panic!(
                "the page never said {needle:?}; it says:\n{}",
                last.lock().unwrap()
            )
        })
    }

    /// Writes a PNG of the viewport to `target/console-screenshots/{name}.png`.
    pub async fn screenshot(&self, name: &str) {
        let png = self.client.screenshot().await.expect("screenshot");
        let dir = screenshots_dir();
        std::fs::create_dir_all(&dir).expect("screenshot dir");
        std::fs::write(dir.join(format!("{name}.png")), png).expect("write screenshot");
    }

    pub async fn close(mut self) {
        let _ = self.client.clone().close().await;
        self.shutdown();
    }

    fn shutdown(&mut self) {
        let _ = self.driver.kill();
        let _ = self.driver.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn capabilities(profile: &Path) -> serde_json::Map<String, serde_json::Value> {
    let args = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1280,1000",
        &format!("--user-data-dir={}", profile.display()),
    ];
    let caps = json!({
        "browserName": "chrome",
        "goog:chromeOptions": { "binary": CHROMIUM, "args": args },
    });
    caps.as_object().cloned().unwrap_or_default()
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn xpath_literal(text: &str) -> String {
    if text.contains('\'') {
        format!("\"{text}\"")
    } else {
        format!("'{text}'")
    }
}
