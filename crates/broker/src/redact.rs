//! Defence in depth for text that leaves the process (errors, headers): credentials that
//! slipped into an error message are masked before it is stored or shown.

/// Masks URL passwords (`scheme://user:secret@host` → `scheme://user:***@host`) and
/// `Basic`/`Bearer` credentials (`Basic abc==` → `Basic ***`).
pub fn scrub_secrets(text: &str) -> String {
    mask_auth_schemes(&mask_url_passwords(text))
}

fn mask_url_passwords(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("://") {
        let (head, tail) = rest.split_at(start + 3);
        out.push_str(head);
        // The authority ends at the first '/', whitespace or quote; userinfo at the last '@'.
        let end = tail
            .find(|c: char| c == '/' || c.is_whitespace() || c == '"' || c == '\'')
            .unwrap_or(tail.len());
        let authority = &tail[..end];
        match (authority.rfind('@'), authority.find(':')) {
            (Some(at), Some(colon)) if colon < at => {
                out.push_str(&authority[..=colon]);
                out.push_str("***");
                out.push_str(&authority[at..]);
            }
            _ => out.push_str(authority),
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

fn mask_auth_schemes(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut masking = false;
    for (index, word) in text.split(' ').enumerate() {
        if index > 0 {
            out.push(' ');
        }
        if masking && !word.is_empty() {
            out.push_str("***");
            masking = false;
            continue;
        }
        out.push_str(word);
        let scheme = word.trim_start_matches(|c: char| !c.is_ascii_alphabetic());
        masking = scheme.eq_ignore_ascii_case("basic") || scheme.eq_ignore_ascii_case("bearer");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::scrub_secrets;

    #[test]
    fn url_passwords_are_masked() {
        assert_eq!(
            scrub_secrets("cannot reach amqp://guest:s3cr%40t@rabbit:5672/%2f now"),
            "cannot reach amqp://guest:***@rabbit:5672/%2f now"
        );
        assert_eq!(
            scrub_secrets("Invalid URL: 'amqp://u:p@h'"),
            "Invalid URL: 'amqp://u:***@h'"
        );
    }

    #[test]
    fn urls_without_a_password_are_left_alone() {
        let text = "GET https://acme.rest.vitally.io/resources/users?x=1 failed";
        assert_eq!(scrub_secrets(text), text);
        assert_eq!(scrub_secrets("amqp://host:5672"), "amqp://host:5672");
    }

    #[test]
    fn basic_and_bearer_credentials_are_masked() {
        assert_eq!(
            scrub_secrets("header Authorization: Basic dXNlcjpwYXNz was refused"),
            "header Authorization: Basic *** was refused"
        );
        assert_eq!(scrub_secrets("bearer abc.def"), "bearer ***");
    }
}
