//! Pure: the server's reply table (RFC 5321 §4.2, enhanced codes RFC 3463 / RFC 2034).
//!
//! Every refusal the server can give is a [`Fault`]; [`Fault::reply`] is the one place that maps a
//! fault to its code, enhanced code and text. Fixed replies are `&'static [u8]`, rendered once.

/// `221` to QUIT.
pub const BYE: &[u8] = b"221 2.0.0 Bye\r\n";
/// `250` to NOOP, RSET and accepted MAIL/RCPT.
pub const OK: &[u8] = b"250 2.0.0 Ok\r\n";
/// `250` to MAIL.
pub const SENDER_OK: &[u8] = b"250 2.1.0 Sender ok\r\n";
/// `250` to RCPT.
pub const RCPT_OK: &[u8] = b"250 2.1.5 Recipient ok\r\n";
/// `354` to DATA.
pub const START_DATA: &[u8] = b"354 End data with <CR><LF>.<CR><LF>\r\n";
/// `252` to VRFY (RFC 5321 §3.5.3: we do not verify, but will try).
pub const VRFY: &[u8] = b"252 2.1.5 Cannot VRFY user, but will accept message and attempt delivery\r\n";
/// `214` to HELP.
pub const HELP: &[u8] = b"214 2.0.0 Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP; see RFC 5321\r\n";
/// `421` on an idle timeout (RFC 5321 §4.5.3.2).
pub const TIMEOUT: &[u8] = b"421 4.4.2 Timeout exceeded, closing connection\r\n";
/// `421` when the relay shuts down.
pub const SHUTDOWN: &[u8] = b"421 4.3.0 Service shutting down, closing connection\r\n";
/// `421` past `--max-connections`.
pub const TOO_MANY_CONNECTIONS: &[u8] = b"421 4.3.2 Too many connections, try again later\r\n";
/// `421` after too many bad commands in a row.
pub const TOO_MANY_ERRORS: &[u8] = b"421 4.7.0 Too many errors, closing connection\r\n";
/// `451` when the spool could not make a message durable.
pub const SPOOL_FAILED: &[u8] = b"451 4.3.0 Temporary local problem storing the message, try again later\r\n";
/// `452` when the spool is out of space.
pub const SPOOL_FULL: &[u8] = b"452 4.3.1 Insufficient system storage, try again later\r\n";

/// Every reason the server refuses a command or a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Verb not recognised.
    UnknownCommand,
    /// Command line longer than 512 octets.
    LineTooLong,
    /// Control characters, NUL or 8-bit bytes in a command line.
    BadCommandBytes,
    /// Command known but its argument is malformed.
    Syntax(&'static str),
    /// Command not valid in this state.
    Sequence(&'static str),
    /// EXPN is not offered.
    ExpnDisabled,
    /// STARTTLS asked for without a certificate.
    TlsUnavailable,
    /// AUTH asked for but not offered.
    AuthUnavailable,
    /// Malformed reverse path.
    BadSender,
    /// Malformed forward path.
    BadRecipient,
    /// Non-ASCII address without SMTPUTF8 on MAIL (RFC 6531 §3.5).
    Utf8NotDeclared,
    /// MAIL/RCPT parameter not recognised or not valid.
    UnknownParameter,
    /// SIZE parameter or actual data over `--max-message-size`.
    TooBig,
    /// Past `--max-recipients`.
    TooManyRecipients,
    /// Client is not allowed to relay.
    RelayDenied,
    /// Bare CR or bare LF in DATA (RFC 5321 §2.3.8; SMTP smuggling defence).
    BareLineEnding,
}

impl Fault {
    /// The reply line for this fault.
    pub fn reply(self) -> &'static [u8] {
        match self {
            Fault::UnknownCommand => b"502 5.5.2 Error: command not recognized\r\n",
            Fault::LineTooLong => b"500 5.5.2 Error: line too long\r\n",
            Fault::BadCommandBytes => b"500 5.5.2 Error: bad characters in command\r\n",
            Fault::Syntax(s) => s.as_bytes(),
            Fault::Sequence(s) => s.as_bytes(),
            Fault::ExpnDisabled => b"502 5.5.1 EXPN not available\r\n",
            Fault::TlsUnavailable => b"454 4.7.0 TLS not available\r\n",
            Fault::AuthUnavailable => b"503 5.5.1 Error: authentication not enabled\r\n",
            Fault::BadSender => b"501 5.1.7 Bad sender address syntax\r\n",
            Fault::BadRecipient => b"501 5.1.3 Bad recipient address syntax\r\n",
            Fault::Utf8NotDeclared => b"553 5.6.7 Non-ASCII address requires the SMTPUTF8 parameter on MAIL\r\n",
            Fault::UnknownParameter => b"555 5.5.4 Unsupported or malformed parameter\r\n",
            Fault::TooBig => b"552 5.3.4 Message size exceeds fixed limit\r\n",
            Fault::TooManyRecipients => b"452 4.5.3 Too many recipients\r\n",
            Fault::RelayDenied => b"554 5.7.1 Relay access denied\r\n",
            Fault::BareLineEnding => {
                b"550 5.6.0 Message refused: bare CR or LF in data (CRLF line endings required)\r\n"
            }
        }
    }

    /// Whether this fault counts towards the "too many bad commands" limit.
    pub fn is_protocol_error(self) -> bool {
        matches!(
            self,
            Fault::UnknownCommand
                | Fault::LineTooLong
                | Fault::BadCommandBytes
                | Fault::Syntax(_)
                | Fault::Sequence(_)
                | Fault::UnknownParameter
                | Fault::BadSender
                | Fault::BadRecipient
        )
    }
}

/// Sequencing replies (`503 5.5.1`), one constant each so the text names what is missing.
pub mod seq {
    /// MAIL/… before EHLO.
    pub const NEED_EHLO: &str = "503 5.5.1 Error: send HELO/EHLO first\r\n";
    /// MAIL inside a transaction.
    pub const NESTED_MAIL: &str = "503 5.5.1 Error: nested MAIL command\r\n";
    /// RCPT before MAIL.
    pub const NEED_MAIL: &str = "503 5.5.1 Error: need MAIL command\r\n";
    /// DATA/BDAT before any accepted RCPT.
    pub const NEED_RCPT: &str = "503 5.5.1 Error: need RCPT command\r\n";
    /// DATA after BDAT in the same transaction.
    pub const DATA_AFTER_BDAT: &str = "503 5.5.1 Error: DATA not allowed after BDAT\r\n";
    /// DATA with BODY=BINARYMIME.
    pub const BINARY_NEEDS_BDAT: &str = "503 5.5.1 Error: BINARYMIME requires BDAT\r\n";
}

/// Syntax replies (`501`).
pub mod syntax {
    /// EHLO/HELO without a usable argument.
    pub const HELO: &str = "501 5.5.4 Syntax: EHLO hostname\r\n";
    /// MAIL without `FROM:`.
    pub const MAIL: &str = "501 5.5.4 Syntax: MAIL FROM:<address>\r\n";
    /// RCPT without `TO:`.
    pub const RCPT: &str = "501 5.5.4 Syntax: RCPT TO:<address>\r\n";
    /// Argument where none is allowed.
    pub const NO_ARGS: &str = "501 5.5.4 Syntax: no parameters allowed\r\n";
    /// BDAT without a valid size.
    pub const BDAT: &str = "501 5.5.4 Syntax: BDAT chunk-size [LAST]\r\n";
}
