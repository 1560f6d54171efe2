//! The MySQL wire protocol, as much of it as a proxy needs.
//!
//! - [`packet`]: framing (4-byte header, sequence ids, 16 MiB splits) over async sockets.
//! - [`codec`]: length-encoded integers/strings, OK/ERR/EOF builders and parsers.
//! - [`handshake`]: the server greeting, the client's handshake response, auth switch.
//! - [`auth`]: mysql_native_password and caching_sha2_password scrambles and verification.
//! - [`response`]: walks a backend response packet by packet (never decoding rows) to find
//!   where it ends and what its final status flags are.

pub mod auth;
pub mod charset;
pub mod codec;
pub mod either;
pub mod handshake;
pub mod packet;
pub mod response;

/// Client/server capability flags (only the ones Breakwater looks at).
pub mod caps {
    pub const LONG_PASSWORD: u32 = 1;
    pub const FOUND_ROWS: u32 = 1 << 1;
    pub const LONG_FLAG: u32 = 1 << 2;
    pub const CONNECT_WITH_DB: u32 = 1 << 3;
    pub const NO_SCHEMA: u32 = 1 << 4;
    pub const COMPRESS: u32 = 1 << 5;
    pub const ODBC: u32 = 1 << 6;
    pub const LOCAL_FILES: u32 = 1 << 7;
    pub const IGNORE_SPACE: u32 = 1 << 8;
    pub const PROTOCOL_41: u32 = 1 << 9;
    pub const INTERACTIVE: u32 = 1 << 10;
    pub const SSL: u32 = 1 << 11;
    pub const IGNORE_SIGPIPE: u32 = 1 << 12;
    pub const TRANSACTIONS: u32 = 1 << 13;
    pub const RESERVED: u32 = 1 << 14;
    pub const SECURE_CONNECTION: u32 = 1 << 15;
    pub const MULTI_STATEMENTS: u32 = 1 << 16;
    pub const MULTI_RESULTS: u32 = 1 << 17;
    pub const PS_MULTI_RESULTS: u32 = 1 << 18;
    pub const PLUGIN_AUTH: u32 = 1 << 19;
    pub const CONNECT_ATTRS: u32 = 1 << 20;
    pub const PLUGIN_AUTH_LENENC_CLIENT_DATA: u32 = 1 << 21;
    pub const SESSION_TRACK: u32 = 1 << 23;
    pub const DEPRECATE_EOF: u32 = 1 << 24;

    /// What the proxy offers clients. No TLS, compression, LOCAL INFILE, DEPRECATE_EOF or
    /// session tracking: responses are forwarded as the backend wrote them, so the client
    /// and the (shared) backend connection must agree on the packet format.
    pub const PROXY_SERVER: u32 = LONG_PASSWORD
        | FOUND_ROWS
        | LONG_FLAG
        | CONNECT_WITH_DB
        | NO_SCHEMA
        | ODBC
        | IGNORE_SPACE
        | PROTOCOL_41
        | INTERACTIVE
        | IGNORE_SIGPIPE
        | TRANSACTIONS
        | RESERVED
        | SECURE_CONNECTION
        | MULTI_STATEMENTS
        | MULTI_RESULTS
        | PS_MULTI_RESULTS
        | PLUGIN_AUTH
        | CONNECT_ATTRS
        | PLUGIN_AUTH_LENENC_CLIENT_DATA;

    /// What the proxy asks of backends (FOUND_ROWS is added per client).
    pub const PROXY_BACKEND: u32 = LONG_PASSWORD
        | LONG_FLAG
        | PROTOCOL_41
        | TRANSACTIONS
        | SECURE_CONNECTION
        | MULTI_STATEMENTS
        | MULTI_RESULTS
        | PS_MULTI_RESULTS
        | PLUGIN_AUTH
        | PLUGIN_AUTH_LENENC_CLIENT_DATA;
}

/// Server status flags found in OK and EOF packets.
pub mod status {
    pub const IN_TRANS: u16 = 1;
    pub const AUTOCOMMIT: u16 = 2;
    pub const MORE_RESULTS_EXISTS: u16 = 8;
    pub const CURSOR_EXISTS: u16 = 0x40;
    pub const IN_TRANS_READONLY: u16 = 0x2000;
}

/// Command bytes.
pub mod cmd {
    pub const QUIT: u8 = 0x01;
    pub const INIT_DB: u8 = 0x02;
    pub const QUERY: u8 = 0x03;
    pub const FIELD_LIST: u8 = 0x04;
    pub const STATISTICS: u8 = 0x09;
    pub const PING: u8 = 0x0e;
    pub const CHANGE_USER: u8 = 0x11;
    pub const STMT_PREPARE: u8 = 0x16;
    pub const STMT_EXECUTE: u8 = 0x17;
    pub const STMT_SEND_LONG_DATA: u8 = 0x18;
    pub const STMT_CLOSE: u8 = 0x19;
    pub const STMT_RESET: u8 = 0x1a;
    pub const SET_OPTION: u8 = 0x1b;
    pub const STMT_FETCH: u8 = 0x1c;
    pub const RESET_CONNECTION: u8 = 0x1f;
}

/// Error codes the proxy itself sends (same numbers MySQL uses for the same situations).
pub mod errcode {
    pub const CON_COUNT: u16 = 1040; // Too many connections
    pub const ACCESS_DENIED: u16 = 1045;
    pub const UNKNOWN_COM: u16 = 1047;
    pub const NET_PACKET_TOO_LARGE: u16 = 1153;
    pub const NET_PACKETS_OUT_OF_ORDER: u16 = 1156;
    pub const MALFORMED_PACKET: u16 = 1835;
    pub const UNKNOWN_STMT_HANDLER: u16 = 1243;
    pub const SERVER_SHUTDOWN: u16 = 1053;
    pub const CONNECTION_KILLED: u16 = 1927;
    pub const LOCK_WAIT_TIMEOUT: u16 = 1205;
    /// ER_OPTION_PREVENTS_STATEMENT: writes refused (read_only, or failover in cooldown).
    pub const OPTION_PREVENTS_STATEMENT: u16 = 1290;
    /// Client-side codes a proxy reports for backend trouble (as ProxySQL does).
    pub const CONN_HOST_ERROR: u16 = 2003;
    pub const SERVER_LOST: u16 = 2013;
    pub const MAX_CONNECT_TIMEOUT: u16 = 9001; // ProxySQL: "Max connect timeout reached"
}
