//! Shared-token challenge-response authentication.
//!
//! Both sides prove knowledge of the token without sending it: the client
//! answers the server's nonce with `HMAC(token, "dmem-client-v1" || server_nonce
//! || client_nonce)` and the server answers with the mirror-image MAC, so a
//! pager also knows it reached a real memory node. Resume secrets and MACs are
//! compared in constant time.

use std::path::Path;

use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;
use thiserror::Error;

use crate::protocol::{Secret, SECRET_LEN};

/// Shortest token accepted: anything shorter is guessable.
pub const MIN_TOKEN_LEN: usize = 16;

#[derive(Debug, Error)]
pub enum AuthError {
    #[error("cannot read token file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("token file {path} holds {len} bytes; at least {MIN_TOKEN_LEN} are required")]
    TooShort { path: String, len: usize },
}

/// Reads a token file; surrounding whitespace (a trailing newline) is ignored.
pub fn load_token(path: &Path) -> Result<Vec<u8>, AuthError> {
    let shown = path.display().to_string();
    let raw = std::fs::read(path).map_err(|source| AuthError::Read {
        path: shown.clone(),
        source,
    })?;
    let token = raw.trim_ascii().to_vec();
    if token.len() < MIN_TOKEN_LEN {
        return Err(AuthError::TooShort {
            path: shown,
            len: token.len(),
        });
    }
    if let Ok(meta) = std::fs::metadata(path) {
        let mode = std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777;
        if mode & 0o077 != 0 {
            // Anyone who can read the token can open sessions on the nodes.
            tracing::warn!(
                "token file {shown} can be read by other users (mode {mode:o}): chmod 600 it"
            );
        }
    }
    Ok(token)
}

/// A fresh random nonce or secret from the OS.
pub fn random_secret() -> Secret {
    let mut s = [0u8; SECRET_LEN];
    getrandom::getrandom(&mut s).expect("the OS random source failed");
    s
}

fn mac(token: &[u8], label: &[u8], a: &Secret, b: &Secret) -> Secret {
    let mut m = Hmac::<Sha256>::new_from_slice(token).expect("HMAC accepts any key length");
    m.update(label);
    m.update(a);
    m.update(b);
    m.finalize().into_bytes().into()
}

/// The MAC a client sends to prove it holds the token.
pub fn client_proof(token: &[u8], server_nonce: &Secret, client_nonce: &Secret) -> Secret {
    mac(token, b"dmem-client-v1", server_nonce, client_nonce)
}

/// The MAC a server sends back to prove it holds the token too.
pub fn server_proof(token: &[u8], client_nonce: &Secret, server_nonce: &Secret) -> Secret {
    mac(token, b"dmem-server-v1", client_nonce, server_nonce)
}

/// Constant-time equality of two secrets.
pub fn secrets_equal(a: &Secret, b: &Secret) -> bool {
    a.ct_eq(b).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proofs_depend_on_token_and_direction() {
        let (s, c) = (random_secret(), random_secret());
        let p = client_proof(b"0123456789abcdef", &s, &c);
        assert!(secrets_equal(
            &p,
            &client_proof(b"0123456789abcdef", &s, &c)
        ));
        assert!(!secrets_equal(
            &p,
            &client_proof(b"0123456789abcdeX", &s, &c)
        ));
        assert!(!secrets_equal(
            &p,
            &server_proof(b"0123456789abcdef", &s, &c)
        ));
    }

    #[test]
    fn short_and_missing_token_files_are_refused() {
        let dir = std::env::temp_dir().join(format!("dmem-auth-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("t");
        std::fs::write(&f, "short\n").unwrap();
        assert!(matches!(
            load_token(&f),
            Err(AuthError::TooShort { len: 5, .. })
        ));
        std::fs::write(&f, "  0123456789abcdef0123\n").unwrap();
        assert_eq!(load_token(&f).unwrap(), b"0123456789abcdef0123");
        assert!(matches!(
            load_token(&dir.join("missing")),
            Err(AuthError::Read { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
