//! Role keys and verifiers: the key a process sends, the digest a server
//! keeps, and the check of a presented key against the accepted verifiers.

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use pushgrid_proto::cluster::Role;
use sha2::{Digest, Sha256};

use super::refusal::Refusal;
use super::{CredentialError, KEY_PREFIX, SECRET_BYTES, VERIFIER_PREFIX, role_by_name, role_name};

/// One role's key: what a process of that role sends on every call.
#[derive(Clone, PartialEq, Eq)]
pub struct RoleKey {
    role: Role,
    text: String,
}

impl fmt::Debug for RoleKey {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "RoleKey({}, <redacted>)", role_name(self.role))
    }
}

impl RoleKey {
    /// A new random key for `role`.
    pub fn generate(role: Role) -> RoleKey {
        let secret: [u8; SECRET_BYTES] = rand::random();
        RoleKey {
            role,
            text: format!(
                "{KEY_PREFIX}.{}.{}",
                role_name(role),
                URL_SAFE_NO_PAD.encode(secret)
            ),
        }
    }

    /// Reads a key (surrounding whitespace ignored).
    pub fn parse(text: &str) -> Result<RoleKey, CredentialError> {
        let text = text.trim();
        let shape = || {
            CredentialError::Invalid(format!(
                "not a pushgrid role key (expected {KEY_PREFIX}.<role>.<secret>)"
            ))
        };
        let mut parts = text.split('.');
        let (Some(KEY_PREFIX), Some(role), Some(secret), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(shape());
        };
        let role = role_by_name(role)
            .ok_or_else(|| CredentialError::Invalid(format!("unknown role {role:?} in key")))?;
        match URL_SAFE_NO_PAD.decode(secret) {
            Ok(bytes) if bytes.len() == SECRET_BYTES => {}
            _ => return Err(shape()),
        }
        Ok(RoleKey {
            role,
            text: text.to_string(),
        })
    }

    pub fn role(&self) -> Role {
        self.role
    }

    /// The key as written in its file and sent on the wire.
    pub fn expose(&self) -> &str {
        &self.text
    }

    pub fn verifier(&self) -> Verifier {
        Verifier {
            role: self.role,
            digest: Sha256::digest(self.text.as_bytes()).into(),
        }
    }
}

/// What a server keeps to recognise one key: its role and SHA-256.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verifier {
    role: Role,
    digest: [u8; 32],
}

impl Verifier {
    pub fn parse(line: &str) -> Result<Verifier, CredentialError> {
        let line = line.trim();
        let shape = || {
            CredentialError::Invalid(format!(
                "{line:?} is not a verifier (expected {VERIFIER_PREFIX}.<role>.<digest>)"
            ))
        };
        let mut parts = line.split('.');
        let (Some(VERIFIER_PREFIX), Some(role), Some(digest), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(shape());
        };
        let role = role_by_name(role).ok_or_else(|| {
            CredentialError::Invalid(format!("unknown role {role:?} in verifier {line:?}"))
        })?;
        let digest: [u8; 32] = URL_SAFE_NO_PAD
            .decode(digest)
            .ok()
            .and_then(|bytes| bytes.try_into().ok())
            .ok_or_else(shape)?;
        Ok(Verifier { role, digest })
    }

    pub fn role(&self) -> Role {
        self.role
    }

    pub fn to_line(&self) -> String {
        format!(
            "{VERIFIER_PREFIX}.{}.{}",
            role_name(self.role),
            URL_SAFE_NO_PAD.encode(self.digest)
        )
    }
}

/// The keys a server accepts: one or more verifiers per role.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Verifiers {
    pub(super) list: Vec<Verifier>,
}

impl Verifiers {
    pub fn new(list: Vec<Verifier>) -> Verifiers {
        Verifiers { list }
    }

    /// One verifier per line; blank lines and `#` comments are skipped. Every
    /// bad line is named in the one error.
    pub fn parse(text: &str) -> Result<Verifiers, CredentialError> {
        let mut list = Vec::new();
        let mut problems = Vec::new();
        for (number, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            match Verifier::parse(line) {
                Ok(verifier) => {
                    if !list.contains(&verifier) {
                        list.push(verifier);
                    }
                }
                Err(error) => problems.push(format!("line {}: {error}", number + 1)),
            }
        }
        if !problems.is_empty() {
            return Err(CredentialError::Invalid(problems.join("; ")));
        }
        Ok(Verifiers { list })
    }

    pub fn to_text(&self) -> String {
        let mut text = String::from(
            "# pushgrid cluster verifiers: one line per accepted role key (pgv1.<role>.<sha256>).\n\
             # Not secret: they let a server check keys, not make them.\n",
        );
        for verifier in &self.list {
            text.push_str(&verifier.to_line());
            text.push('\n');
        }
        text
    }

    pub fn list(&self) -> &[Verifier] {
        &self.list
    }

    pub fn contains(&self, verifier: &Verifier) -> bool {
        self.list.contains(verifier)
    }

    /// The role of a presented key: it must be well formed and its digest
    /// equal (compared in constant time) to a verifier of the role it names.
    pub fn check(&self, presented: &str) -> Result<Role, Refusal> {
        let mut parts = presented.splitn(3, '.');
        let (Some(KEY_PREFIX), Some(role), Some(_)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(Refusal::Malformed);
        };
        let role = role_by_name(role).ok_or(Refusal::Malformed)?;
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        let mut matched = false;
        for verifier in self.list.iter().filter(|verifier| verifier.role == role) {
            // No early exit: every verifier of the role is compared.
            matched |= constant_time_eq(&verifier.digest, &digest);
        }
        if matched {
            Ok(role)
        } else {
            Err(Refusal::Unknown(role))
        }
    }
}

/// Equal contents, in time that does not depend on where they differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let difference = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(difference) == 0
}
