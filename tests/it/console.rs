//! The operator console in a real headless Chromium, over the real producer, consumers,
//! PostgreSQL, Redis, RabbitMQ and the fake Vitally. Each test leaves screenshots of the
//! pages it saw under `target/console-screenshots/`.

use std::time::Duration;

use fantoccini::Locator;
use thena_events::sample;
use thena_testkit::wait_until;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::{
    browser::Browser,
    support::{Fleet, WS},
};

const TOKEN: &str = "console-test-admin-token";

/// A fleet whose producer serves the console on its API port.
struct Console {
    fleet: Fleet,
    url: String,
    stop: CancellationToken,
    producer: JoinHandle<std::io::Result<()>>,
}

impl Console {
    async fn start() -> Console {
        let fleet = Fleet::start_with(
            fake_vitally::FakeConfig::default(),
            &[("PRODUCER_TOKEN", TOKEN), ("CONSOLE_ENABLED", "true")],
        )
        .await;
        let registry = prometheus::Registry::new();
        let state = thena_producer::from_config(&fleet.config, &registry, Default::default())
            .await
            .expect("producer");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let stop = CancellationToken::new();
        let producer = tokio::spawn(thena_producer::run(listener, state, stop.clone()));
        Console {
            fleet,
            url,
            stop,
            producer,
        }
    }

    fn at(&self, path: &str) -> String {
        format!("{}{path}", self.url)
    }

    async fn sign_in(&self, browser: &Browser) {
        browser.goto(&self.at("/console/sign-in")).await;
        browser.fill("#token", TOKEN).await;
        browser.click("button[type=submit]").await;
        browser.wait_for_text("Sign out").await;
    }

    async fn stop(self) {
        self.stop.cancel();
        self.producer.await.unwrap().unwrap();
        self.fleet.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_signs_in_connects_vitally_through_the_modal_and_turns_updates_off() {
    let console = Console::start().await;
    let browser = Browser::start().await;

    // Signed out, every page leads to the sign-in form, which comes back after.
    browser.goto(&console.at("/console/integrations")).await;
    assert!(browser.path().await.starts_with("/console/sign-in?next="));
    browser.screenshot("sign-in").await;
    browser.fill("#token", "not-the-token").await;
    browser.click("button[type=submit]").await;
    assert_eq!(browser.text(".error").await, "That is not an admin token.");
    browser.fill("#token", TOKEN).await;
    browser.click("button[type=submit]").await;
    browser.wait_for_text("No Vitally integration yet").await;
    assert_eq!(browser.path().await, "/console/integrations");

    // The product doc's modal: Add Integration → Connect (top right) → credentials.
    browser.click_text("Add integration").await;
    browser
        .wait_for_text("Sync Thena requests to Vitally")
        .await;
    browser.screenshot("add-1-connect").await;
    browser.click_text("Connect").await;
    browser.fill("#workspace_id", "T-NEW").await;
    browser
        .fill("#api_url", &console.fleet.fake.base_url())
        .await;
    browser.fill("#auth_header", "Basic bm90LXRoZS1rZXk6").await;
    browser.click_text("Continue").await;
    let error = browser.text(".modal .error").await;
    assert!(
        error.starts_with("Vitally rejected this authentication header."),
        "{error}"
    );
    // The header typed is never written back into the page.
    assert!(
        !browser
            .client
            .source()
            .await
            .unwrap()
            .contains("bm90LXRoZS1rZXk6")
    );
    browser.screenshot("add-2-rejected-header").await;

    browser
        .fill("#auth_header", &console.fleet.fake.auth_header())
        .await;
    browser.click_text("Continue").await;
    browser
        .wait_for_text("accepted the header for workspace T-NEW")
        .await;
    let push = browser.find("input[name=push_requests]").await;
    let update = browser.find("input[name=update_requests]").await;
    assert!(push.prop("checked").await.unwrap().as_deref() == Some("true"));
    assert!(update.prop("checked").await.unwrap().as_deref() == Some("true"));
    browser.fill("#categories", "Product, Region").await;
    browser.screenshot("add-3-settings").await;
    browser.click_text("Finish").await;

    let summary = browser.wait_for_text("Connected T-NEW to Vitally").await;
    assert!(summary.contains("Created \"Thena Requests\""), "{summary}");
    assert!(summary.contains("Region"), "{summary}");
    let traits = browser.find_all_text("ul.traits li").await;
    let own =
        vitally_client::traits::FIXED_TRAITS.len() + vitally_client::traits::EXTRA_TRAITS.len();
    assert_eq!(
        traits.len(),
        own + 2,
        "the integration's traits and 2 categories: {traits:?}"
    );
    browser.screenshot("add-4-summary").await;
    let stored = console.fleet.store.get("T-NEW").await.unwrap().unwrap();
    assert!(stored.push_requests && stored.update_requests);

    // Edit the toggles: update-requests off.
    browser.click_text("Done").await;
    browser.wait_for_text("Settings").await;
    browser.click("input[name=update_requests]").await;
    browser.click_text("Save").await;
    browser
        .wait_for_text("Saved: update_requests: true → false")
        .await;
    let stored = console.fleet.store.get("T-NEW").await.unwrap().unwrap();
    assert!(!stored.update_requests && stored.push_requests);
    let history = console.fleet.store.history("T-NEW", 10).await.unwrap();
    let last = history.last().unwrap();
    assert_eq!(
        (last.actor.as_str(), last.action.as_str()),
        ("console", "settings_changed")
    );
    browser.screenshot("integration").await;

    browser.close().await;
    console.stop().await;
}

impl Browser {
    async fn find_all_text(&self, css: &str) -> Vec<String> {
        let mut out = Vec::new();
        for element in self.client.find_all(Locator::Css(css)).await.unwrap() {
            out.push(element.text().await.unwrap());
        }
        out
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_looks_up_a_skipped_request_and_sees_why() {
    let mut console = Console::start().await;
    console.fleet.connect(WS, |_| {}).await;
    console.fleet.spawn_consumer().await;
    // One request that syncs, one whose requestor writes from a free-mail address.
    console
        .fleet
        .publish(&sample::event(WS, 501, 1, Some("alice@acme.com")))
        .await;
    console
        .fleet
        .publish(&sample::event(WS, 502, 1, Some("someone@gmail.com")))
        .await;
    console.fleet.wait_settled(2).await;

    let browser = Browser::start().await;
    console.sign_in(&browser).await;
    let list = browser.wait_for_text("Last 24 h").await;
    assert!(list.contains("1 synced · 1 skipped"), "{list}");
    browser.screenshot("integrations").await;
    browser.client.set_window_size(390, 844).await.unwrap();
    browser.screenshot("integrations-phone").await;
    browser.client.set_window_size(1280, 1000).await.unwrap();

    browser.click_text("Requests").await;
    browser.fill("#q", "someone@gmail.com").await;
    browser.click_text("Look up").await;
    browser.wait_for_text("1 request(s)").await;
    browser.click_text("502").await;
    let page = browser.wait_for_text("Timeline").await;
    assert!(page.contains("skipped: free_mail_domain"), "{page}");
    assert!(page.contains("never synced"), "{page}");
    browser.screenshot("request").await;

    browser.click_text("Explain").await;
    let explained = browser.wait_for_text("→ no sync: free_mail_domain").await;
    assert!(
        explained.contains("domain fallback: gmail.com is a free-mail domain"),
        "{explained}"
    );
    browser.screenshot("explain").await;

    browser.click_text("Back to the request").await;
    browser.click_text("Resync").await;
    browser
        .wait_for_text("Resent v1 through the pipeline")
        .await;
    // The resent snapshot came round again: a second outcome in the ledger.
    wait_until(
        "the resync's outcome in the ledger",
        Duration::from_secs(20),
        || async {
            let record = thena_store::ledger::Ledger::read_only(console.fleet.store.db().clone())
                .show(WS, 502, 50)
                .await
                .ok()??;
            (record.history.len() >= 2).then_some(())
        },
    )
    .await;

    browser.close().await;
    console.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_form_posted_without_its_csrf_token_is_refused() {
    let console = Console::start().await;
    console.fleet.connect(WS, |_| {}).await;
    let browser = Browser::start().await;
    console.sign_in(&browser).await;
    browser
        .goto(&console.at(&format!("/console/integrations/{WS}")))
        .await;
    browser.find("input[name=csrf]").await;
    // A forged form: the same fields, without the session's token.
    browser
        .client
        .execute(
            "document.querySelectorAll('input[name=csrf]').forEach(e => e.remove());",
            vec![],
        )
        .await
        .unwrap();
    browser.click("input[name=update_requests]").await;
    browser.click_text("Save").await;
    let refused = browser.wait_for_text("This form was refused").await;
    assert!(refused.contains("CSRF"), "{refused}");
    browser.screenshot("csrf-refused").await;
    let stored = console.fleet.store.get(WS).await.unwrap().unwrap();
    assert!(stored.update_requests, "the refused form changed nothing");

    // Without a session at all, a post goes to the sign-in page and changes nothing.
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let answer = http
        .post(console.at(&format!("/console/integrations/{WS}/settings")))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("push_requests=true")
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 303);
    assert_eq!(
        answer.headers()["location"].to_str().unwrap(),
        "/console/sign-in?next=%2Fconsole"
    );
    let stored = console.fleet.store.get(WS).await.unwrap().unwrap();
    assert!(stored.update_requests, "an anonymous post changed nothing");

    browser.close().await;
    console.stop().await;
}

/// The console over plain HTTP, as a script would use it.
struct Http {
    client: reqwest::Client,
    base: String,
    cookie: String,
}

impl Http {
    async fn sign_in(console: &Console) -> Http {
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap();
        let answer = client
            .post(console.at("/console/sign-in"))
            .header("accept", "application/json")
            .header("content-type", "application/x-www-form-urlencoded")
            .body(format!("token={TOKEN}"))
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 200);
        let set = answer.headers()["set-cookie"].to_str().unwrap().to_owned();
        assert!(
            set.contains("HttpOnly") && set.contains("SameSite=Strict"),
            "{set}"
        );
        let body = answer.text().await.unwrap();
        assert!(!body.contains(TOKEN) && !set.contains(TOKEN));
        Http {
            client,
            base: console.url.clone(),
            cookie: set.split(';').next().unwrap().to_owned(),
        }
    }

    async fn get(&self, path: &str, accept: &str) -> reqwest::Response {
        self.client
            .get(format!("{}{path}", self.base))
            .header("cookie", &self.cookie)
            .header("accept", accept)
            .send()
            .await
            .unwrap()
    }

    async fn json(&self, path: &str) -> serde_json::Value {
        let answer = self.get(path, "application/json").await;
        assert_eq!(answer.status(), 200, "{path}");
        answer.json().await.unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_page_answers_json_and_signing_out_ends_the_session() {
    let mut console = Console::start().await;
    console.fleet.connect(WS, |_| {}).await;
    console.fleet.spawn_consumer().await;
    console
        .fleet
        .publish(&sample::event(WS, 601, 1, Some("alice@acme.com")))
        .await;
    console.fleet.wait_settled(1).await;
    let http = Http::sign_in(&console).await;

    let list = http.json("/console/integrations").await;
    let card = &list["integrations"][0];
    assert_eq!(card["integration"]["workspace_id"], WS);
    assert_eq!(card["integration"]["auth_header"], "Basic <redacted>");
    assert_eq!(card["activity"]["totals"]["synced"], 1);
    assert_eq!(card["activity"]["hours"].as_array().unwrap().len(), 24);
    assert!(card["last_synced_at"].is_string());
    let calls = card["usage"]["this_minute"].as_u64().unwrap()
        + card["usage"]["last_minute"].as_u64().unwrap();
    assert!(
        calls >= 1,
        "the sync's Vitally calls count against the budget: {card}"
    );
    let detail = http.json(&format!("/console/integrations/{WS}")).await;
    assert_eq!(detail["history"][0]["action"], "connected");
    let found = http.json("/console/requests?q=alice%40acme.com").await;
    assert_eq!(found["requests"][0]["request_id"], 601);
    let request = http.json(&format!("/console/requests/{WS}/601")).await;
    assert_eq!(request["outcome"], "synced");
    assert!(
        request["vitally_instance_url"]
            .as_str()
            .unwrap()
            .contains("externalId=thena%3AT-ACME%3A601")
    );
    let explained = http
        .json(&format!("/console/requests/{WS}/601/explain"))
        .await;
    assert!(
        explained["verdict"]
            .as_str()
            .unwrap()
            .starts_with("would update instance")
    );

    // A paused integration says so, and why.
    console
        .fleet
        .store
        .set_health(
            WS,
            None,
            vitally_client::integrations::Health::AuthRejected,
            Some("Vitally answered 401 to the stored key"),
            "test",
        )
        .await
        .unwrap();
    let list = http.json("/console/integrations").await;
    let paused = &list["integrations"][0]["integration"];
    assert_eq!(paused["health"], "paused: auth_rejected");
    assert_eq!(
        paused["health_detail"],
        "Vitally answered 401 to the stored key"
    );
    let page = http
        .get("/console/integrations", "text/html")
        .await
        .text()
        .await
        .unwrap();
    assert!(page.contains("paused: auth_rejected") && page.contains("answered 401"));

    // A page names its admin API twin, and carries the console's policy.
    let page = http
        .get(&format!("/console/integrations/{WS}"), "text/html")
        .await;
    assert_eq!(
        page.headers()["link"],
        format!("</v1/integrations/{WS}>; rel=\"alternate\"; type=\"application/json\"")
    );
    let csp = page.headers()["content-security-policy"].to_str().unwrap();
    assert!(csp.starts_with("default-src 'none'"), "{csp}");
    let html = page.text().await.unwrap();
    assert!(!html.contains(TOKEN) && !html.contains("ZmFrZS1zZWNyZXQta2V5"));

    // Signing out ends the session on the server, not only in the browser.
    let csrf = html
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap()
        .to_owned();
    let out = http
        .client
        .post(format!("{}/console/sign-out", http.base))
        .header("cookie", &http.cookie)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("csrf={csrf}"))
        .send()
        .await
        .unwrap();
    assert_eq!(out.status(), 303);
    let after = http.get("/console/integrations", "application/json").await;
    assert_eq!(after.status(), 401);

    console.stop().await;
}

/// `demo --serve` as a child process, stopped with Ctrl-C (SIGINT) even when the test
/// fails, so it never outlives the test.
struct ServingDemo(std::process::Child);

impl ServingDemo {
    fn interrupt(&self) {
        let _ = std::process::Command::new("kill")
            .args(["-INT", &self.0.id().to_string()])
            .status();
    }
}

impl Drop for ServingDemo {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            self.interrupt();
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            while matches!(self.0.try_wait(), Ok(None)) && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_serve_prints_the_console_url_and_how_to_sign_in() {
    use std::{
        io::{BufRead, BufReader},
        process::{Command, Stdio},
    };
    let _ = rustls::crypto::ring::default_provider().install_default();
    let path = std::env::var("PATH").unwrap_or_default();
    let mut demo = ServingDemo(
        Command::new(env!("CARGO_BIN_EXE_thena-vitally"))
            .args(["demo", "--serve"])
            .env_clear()
            .env("PATH", path)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("run the demo"),
    );
    let (lines, read) = std::sync::mpsc::channel();
    let stdout = demo.0.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines.send(line).is_err() {
                return;
            }
        }
    });
    let line = wait_until(
        "the demo prints the console's URL",
        Duration::from_secs(90),
        || {
            let line = read
                .try_iter()
                .find(|l| l.trim_start().starts_with("console"));
            async move { line }
        },
    )
    .await;
    // "console   http://127.0.0.1:PORT/console  (sign in with the demo's admin token T)"
    let url = line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .expect("a URL")
        .to_owned();
    let token = line
        .trim_end_matches(')')
        .rsplit(' ')
        .next()
        .unwrap()
        .to_owned();
    assert!(
        line.contains("sign in with the demo's admin token"),
        "{line}"
    );

    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let signed_in = http
        .post(format!("{url}/sign-in"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("token={token}"))
        .send()
        .await
        .unwrap();
    assert_eq!(signed_in.status(), 303, "{line}");
    let cookie = signed_in.headers()["set-cookie"].to_str().unwrap();
    let cookie = cookie.split(';').next().unwrap().to_owned();
    let page = http
        .get(format!("{url}/integrations"))
        .header("cookie", cookie)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(page.contains("T0DEMO"), "{page}");

    // Ctrl-C: the demo stops serving and removes what it created.
    demo.interrupt();
    let stopped = wait_until(
        "the demo exits after Ctrl-C",
        Duration::from_secs(30),
        || {
            let status = demo.0.try_wait().ok().flatten();
            async move { status }
        },
    )
    .await;
    assert!(stopped.success(), "{stopped:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_replays_a_parked_message_after_the_fix_and_sees_it_synced() {
    use fake_vitally::{Fault, FaultKind};
    let mut console = Console::start().await;
    console.fleet.connect(WS, |_| {}).await;
    // Vitally refuses the instance once with a 400 that no retry can fix: parked.
    console.fleet.fake.inject(Fault::NextN {
        method: Some("POST".into()),
        path_prefix: "/resources/customObjects".into(),
        count: 1,
        kind: FaultKind::Status(400),
    });
    console.fleet.spawn_consumer().await;
    console.fleet.spawn_replayer().await;
    console
        .fleet
        .publish(&sample::event(WS, 701, 1, Some("alice@acme.com")))
        .await;
    wait_until(
        "the message in the parked set",
        Duration::from_secs(20),
        || async { (console.fleet.parked().await == 1).then_some(()) },
    )
    .await;

    let browser = Browser::start().await;
    console.sign_in(&browser).await;
    browser.click_text("Dead letters").await;
    let list = browser.wait_for_text("vitally_400").await;
    assert!(list.contains(WS) && list.contains("701"), "{list}");
    browser.screenshot("dead-letters").await;

    // Everything matching, previewed first: nothing is sent.
    browser.click_text("Preview replay").await;
    browser
        .wait_for_text("1 message(s) would be replayed")
        .await;
    assert_eq!(console.fleet.parked().await, 1, "a preview sends nothing");
    browser.screenshot("dead-letters-preview").await;

    // The fault answered once: Vitally is fixed. Replay the one message.
    browser.goto(&console.at("/console/dead-letters")).await;
    let id = browser.find("table td a").await.text().await.unwrap();
    browser.click_text(&id).await;
    browser.wait_for_text("Replay this message").await;
    browser.screenshot("dead-letter").await;
    browser.fill("#why", "INC-1 Vitally fixed").await;
    browser.click_text("Replay").await;
    browser.wait_for_text("replay #").await;
    wait_until("the replay finished", Duration::from_secs(20), || async {
        browser.client.refresh().await.ok()?;
        let status = browser.client.find(Locator::Css("p.notice")).await.ok()?;
        status
            .text()
            .await
            .ok()?
            .starts_with("Finished: 1 of 1 done")
            .then_some(())
    })
    .await;
    browser.screenshot("dead-letters-replayed").await;

    // The request's page says it synced.
    browser
        .goto(&console.at(&format!("/console/requests/{WS}/701")))
        .await;
    wait_until(
        "the replayed request synced",
        Duration::from_secs(20),
        || async {
            browser.client.refresh().await.ok()?;
            let body = browser.client.find(Locator::Css("dl.figures")).await.ok()?;
            body.text()
                .await
                .ok()?
                .contains("synced: created")
                .then_some(())
        },
    )
    .await;
    let page = browser.wait_for_text("Timeline").await;
    assert!(page.contains("parked: vitally_400"), "{page}");
    browser.screenshot("request-replayed").await;
    assert_eq!(console.fleet.instances_for(WS, 701).len(), 1);

    browser.close().await;
    console.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purge_needs_the_count_typed_and_lands_in_the_audit_trail() {
    use fake_vitally::{Fault, FaultKind};
    let mut console = Console::start().await;
    console.fleet.connect(WS, |_| {}).await;
    console.fleet.fake.inject(Fault::NextN {
        method: Some("POST".into()),
        path_prefix: "/resources/customObjects".into(),
        count: 2,
        kind: FaultKind::Status(400),
    });
    console.fleet.spawn_consumer().await;
    console.fleet.spawn_replayer().await;
    for id in [801, 802] {
        console
            .fleet
            .publish(&sample::event(WS, id, 1, Some("alice@acme.com")))
            .await;
    }
    wait_until(
        "two messages in the parked set",
        Duration::from_secs(20),
        || async { (console.fleet.parked().await == 2).then_some(()) },
    )
    .await;
    let http = Http::sign_in(&console).await;
    let page = http
        .get(
            "/console/dead-letters/purge?reason=vitally_400",
            "text/html",
        )
        .await
        .text()
        .await
        .unwrap();
    assert!(page.contains("Purge 2 parked message(s)?"), "{page}");
    let csrf = page
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap()
        .to_owned();
    let purge = |confirm: &'static str| {
        http.client
            .post(format!("{}/console/dead-letters/purge", http.base))
            .header("cookie", &http.cookie)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(format!(
                "csrf={csrf}&reason=vitally_400&why=INC-2&confirm={}",
                confirm.replace(' ', "+")
            ))
            .send()
    };
    let refused = purge("purge 3").await.unwrap().text().await.unwrap();
    assert!(refused.contains("Type exactly"), "{refused}");
    assert_eq!(
        console.fleet.parked().await,
        2,
        "a wrong count purges nothing"
    );

    let purged = purge("purge 2").await.unwrap();
    assert_eq!(purged.status(), 303);
    assert!(
        purged.headers()["location"]
            .to_str()
            .unwrap()
            .starts_with("/console/dead-letters/audit/")
    );
    assert_eq!(console.fleet.parked().await, 0);
    let audit = http.json("/console/dead-letters/audit").await;
    assert_eq!(audit["audit"][0]["action"], "purge");
    assert_eq!(audit["audit"][0]["done"], 2);
    assert_eq!(audit["audit"][0]["actor"], "console");
    console.stop().await;
}
