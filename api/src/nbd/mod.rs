//! The NBD wire format (fixed newstyle handshake, simple replies), as pure encode/parse functions:
//! the server's side here (the engine's), the client's side in [`client`]. Everything works on
//! byte slices so it can be property-tested without sockets.

pub mod client;

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943; // "NBDMAGIC"
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054; // "IHAVEOPT"
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

// Handshake flags (server) and client flags.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const CLIENT_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const CLIENT_NO_ZEROES: u32 = 1 << 1;

// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;

// Option reply types; the error ones have this bit set.
pub const REP_FLAG_ERROR: u32 = 1 << 31;
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
pub const REP_ERR_POLICY: u32 = (1 << 31) + 2;
pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
pub const REP_ERR_SHUTDOWN: u32 = (1 << 31) + 7;
pub const REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;

// Info types for OPT_INFO / OPT_GO.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// Transmission flags.
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;

// Commands and command flags.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// Flags this server accepts: FUA on any command (the spec says a server that advertises
/// SEND_FUA must), NO_HOLE on WRITE_ZEROES. DF, REQ_ONE, FAST_ZERO and anything newer were
/// never advertised or negotiated, so they get EINVAL.
const FLAGS_ANY: u16 = CMD_FLAG_FUA;
const FLAGS_WRITE_ZEROES: u16 = CMD_FLAG_FUA | CMD_FLAG_NO_HOLE;

// Errors carried in simple replies (Linux errno values, as the protocol defines them).
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

/// Largest option payload we accept during the handshake (names are at most 4096 bytes by the spec).
/// A longer one is skipped without buffering and refused with `REP_ERR_TOO_BIG`.
pub const MAX_OPTION_LEN: u32 = 64 * 1024;
/// Longest string (error message, name) the spec allows in a reply.
pub const MAX_STRING: usize = 4096;
/// Largest READ/WRITE payload; advertised as the maximum block size.
pub const MAX_PAYLOAD: u32 = 32 * 1024 * 1024;

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    #[error("bad request magic {0:#x}")]
    BadRequestMagic(u32),
    #[error("unexpected reply magic {0:#x}")]
    BadReplyMagic(u32),
    #[error("bad option magic {0:#x}")]
    BadOptionMagic(u64),
    #[error("NBD_OPT_EXPORT_NAME of {0} bytes exceeds the limit")]
    OptionTooLong(u32),
    #[error("malformed option payload: {0}")]
    MalformedOption(&'static str),
}

/// The fixed 28-byte transmission request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub kind: u16,
    pub handle: u64,
    pub offset: u64,
    pub length: u32,
}

impl Request {
    pub const LEN: usize = 28;

    pub fn parse(b: &[u8; Self::LEN]) -> Result<Self, ProtoError> {
        let magic = be_u32(&b[0..4]);
        if magic != REQUEST_MAGIC {
            return Err(ProtoError::BadRequestMagic(magic));
        }
        Ok(Request {
            flags: be_u16(&b[4..6]),
            kind: be_u16(&b[6..8]),
            handle: be_u64(&b[8..16]),
            offset: be_u64(&b[16..24]),
            length: be_u32(&b[24..28]),
        })
    }

    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.kind.to_be_bytes());
        b[8..16].copy_from_slice(&self.handle.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.length.to_be_bytes());
        b
    }

    /// Whether a WRITE payload of `length` bytes follows this header on the wire.
    pub fn has_payload(&self) -> bool {
        self.kind == CMD_WRITE
    }

    /// Checks the request against an export of `size` bytes; `Err(errno)` is the reply to send.
    /// The errors are the ones the NBD spec names ("Error values", "Block size constraints"):
    /// unknown command or flag, READ/WRITE over the advertised maximum, READ/TRIM past the end:
    /// EINVAL; WRITE/WRITE_ZEROES past the end: ENOSPC; a write of any kind on a read-only
    /// export: EPERM. TRIM and WRITE_ZEROES carry no payload, so any u32 length is served (in
    /// pieces; the CSI plugin's FUSE path sends 1 GiB). Length 0 is valid (the spec leaves it
    /// open and asks the server not to disconnect).
    pub fn validate(&self, size: u64, read_only: bool) -> Result<(), u32> {
        let allowed = match self.kind {
            CMD_READ | CMD_WRITE | CMD_FLUSH | CMD_TRIM => FLAGS_ANY,
            CMD_WRITE_ZEROES => FLAGS_WRITE_ZEROES,
            _ => return Err(EINVAL),
        };
        if self.flags & !allowed != 0 {
            return Err(EINVAL);
        }
        let in_range = self
            .offset
            .checked_add(u64::from(self.length))
            .is_some_and(|end| end <= size);
        match self.kind {
            CMD_READ | CMD_WRITE if self.length > MAX_PAYLOAD => Err(EINVAL),
            CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES if read_only => Err(EPERM),
            CMD_WRITE | CMD_WRITE_ZEROES if !in_range => Err(ENOSPC),
            CMD_READ | CMD_TRIM if !in_range => Err(EINVAL),
            _ => Ok(()),
        }
    }
}

/// The 16-byte simple reply header; READ data follows it when `error == 0`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimpleReply {
    /// 0, or the errno of a failed request.
    pub error: u32,
    pub handle: u64,
}

impl SimpleReply {
    pub const LEN: usize = 16;

    pub fn parse(b: &[u8; Self::LEN]) -> Result<Self, ProtoError> {
        let magic = be_u32(&b[0..4]);
        if magic != SIMPLE_REPLY_MAGIC {
            return Err(ProtoError::BadReplyMagic(magic));
        }
        Ok(SimpleReply {
            error: be_u32(&b[4..8]),
            handle: be_u64(&b[8..16]),
        })
    }

    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
        b[4..8].copy_from_slice(&self.error.to_be_bytes());
        b[8..16].copy_from_slice(&self.handle.to_be_bytes());
        b
    }
}

/// The simple reply header for `handle`.
pub fn simple_reply(error: u32, handle: u64) -> [u8; SimpleReply::LEN] {
    SimpleReply { error, handle }.encode()
}

/// The 16-byte header of a client option: (option, payload length), after the IHAVEOPT magic.
/// The length is not checked here: the caller skips or refuses what exceeds `MAX_OPTION_LEN`.
pub fn parse_option_header(b: &[u8; 16]) -> Result<(u32, u32), ProtoError> {
    let magic = be_u64(&b[0..8]);
    if magic != IHAVEOPT {
        return Err(ProtoError::BadOptionMagic(magic));
    }
    Ok((be_u32(&b[8..12]), be_u32(&b[12..16])))
}

/// `msg` cut to the spec's string limit (at a char boundary), for error replies that quote
/// what the client sent.
pub fn bounded_message(msg: &str) -> &str {
    if msg.len() <= MAX_STRING {
        return msg;
    }
    let mut end = MAX_STRING;
    while !msg.is_char_boundary(end) {
        end -= 1;
    }
    &msg[..end]
}

/// An option reply: header followed by `data`.
pub fn option_reply(option: u32, reply: u32, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(20 + data.len());
    v.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    v.extend_from_slice(&option.to_be_bytes());
    v.extend_from_slice(&reply.to_be_bytes());
    // Replies we build are small (names, infos); the cast cannot truncate.
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    v
}

/// The payload of OPT_INFO / OPT_GO: export name and the info types the client asked for.
#[derive(Debug, PartialEq, Eq)]
pub struct GoRequest {
    pub name: String,
    pub infos: Vec<u16>,
}

pub fn parse_go(payload: &[u8]) -> Result<GoRequest, ProtoError> {
    if payload.len() < 6 {
        return Err(ProtoError::MalformedOption(
            "OPT_GO payload shorter than 6 bytes",
        ));
    }
    let name_len = be_u32(&payload[0..4]) as usize;
    let rest = &payload[4..];
    if rest.len() < name_len + 2 {
        return Err(ProtoError::MalformedOption(
            "export name longer than the payload",
        ));
    }
    let name = std::str::from_utf8(&rest[..name_len])
        .map_err(|_| ProtoError::MalformedOption("export name is not UTF-8"))?
        .to_string();
    let rest = &rest[name_len..];
    let n = be_u16(&rest[0..2]) as usize;
    let rest = &rest[2..];
    if rest.len() != n * 2 {
        return Err(ProtoError::MalformedOption(
            "info request count does not match the payload",
        ));
    }
    let infos = rest.chunks_exact(2).map(be_u16).collect();
    Ok(GoRequest { name, infos })
}

pub fn encode_go(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&(name.len() as u32).to_be_bytes());
    v.extend_from_slice(name.as_bytes());
    v.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        v.extend_from_slice(&i.to_be_bytes());
    }
    v
}

pub fn info_export(size: u64, tflags: u16) -> Vec<u8> {
    let mut v = Vec::with_capacity(12);
    v.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    v.extend_from_slice(&size.to_be_bytes());
    v.extend_from_slice(&tflags.to_be_bytes());
    v
}

pub fn info_block_size(min: u32, preferred: u32, max: u32) -> Vec<u8> {
    let mut v = Vec::with_capacity(14);
    v.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    v.extend_from_slice(&min.to_be_bytes());
    v.extend_from_slice(&preferred.to_be_bytes());
    v.extend_from_slice(&max.to_be_bytes());
    v
}

pub fn info_name(name: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(2 + name.len());
    v.extend_from_slice(&INFO_NAME.to_be_bytes());
    v.extend_from_slice(name.as_bytes());
    v
}

pub fn info_description(text: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(2 + text.len());
    v.extend_from_slice(&INFO_DESCRIPTION.to_be_bytes());
    v.extend_from_slice(text.as_bytes());
    v
}

/// The NBD_REP_SERVER payload of OPT_LIST.
pub fn rep_server(name: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(4 + name.len());
    v.extend_from_slice(&(name.len() as u32).to_be_bytes());
    v.extend_from_slice(name.as_bytes());
    v
}

pub(crate) fn be_u16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}
pub(crate) fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}
pub(crate) fn be_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn request_roundtrip(flags: u16, kind: u16, handle: u64, offset: u64, length: u32) {
            let r = Request { flags, kind, handle, offset, length };
            prop_assert_eq!(Request::parse(&r.encode()), Ok(r));
        }

        #[test]
        fn reply_roundtrip(error: u32, handle: u64) {
            let r = SimpleReply { error, handle };
            prop_assert_eq!(SimpleReply::parse(&r.encode()), Ok(r));
        }

        #[test]
        fn request_parse_never_panics(bytes in proptest::array::uniform28(any::<u8>())) {
            let _ = Request::parse(&bytes);
        }

        #[test]
        fn go_roundtrip(name in "[a-zA-Z0-9/_-]{0,64}", infos in proptest::collection::vec(any::<u16>(), 0..8)) {
            let p = encode_go(&name, &infos);
            prop_assert_eq!(parse_go(&p), Ok(GoRequest { name, infos }));
        }

        #[test]
        fn go_parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = parse_go(&bytes);
        }

        #[test]
        fn validate_accepts_exactly_in_range(offset in 0u64..1 << 20, length in 0u32..1 << 16, size in 0u64..1 << 21) {
            let r = Request { flags: 0, kind: CMD_READ, handle: 1, offset, length };
            let ok = offset + u64::from(length) <= size;
            prop_assert_eq!(r.validate(size, false).is_ok(), ok);
        }
    }

    #[test]
    fn validate_errors() {
        let r = |kind, offset, length| Request {
            flags: 0,
            kind,
            handle: 0,
            offset,
            length,
        };
        assert_eq!(r(CMD_WRITE, 4096, 1).validate(4096, false), Err(ENOSPC));
        assert_eq!(r(CMD_READ, 4095, 2).validate(4096, false), Err(EINVAL));
        assert_eq!(r(CMD_READ, u64::MAX, 2).validate(4096, false), Err(EINVAL));
        assert_eq!(
            r(CMD_READ, 0, MAX_PAYLOAD + 1).validate(u64::MAX, false),
            Err(EINVAL)
        );
        assert_eq!(
            r(CMD_WRITE, 0, MAX_PAYLOAD + 1).validate(u64::MAX, false),
            Err(EINVAL)
        );
        // Payload-free commands take any length the export holds.
        assert_eq!(r(CMD_TRIM, 0, u32::MAX).validate(u64::MAX, false), Ok(()));
        assert_eq!(
            r(CMD_WRITE_ZEROES, 0, u32::MAX).validate(u64::MAX, false),
            Ok(())
        );
        assert_eq!(r(CMD_WRITE, 0, 512).validate(4096, true), Err(EPERM));
        assert_eq!(r(CMD_TRIM, 0, 512).validate(4096, true), Err(EPERM));
        assert_eq!(r(CMD_WRITE_ZEROES, 0, 512).validate(4096, true), Err(EPERM));
        assert_eq!(
            r(CMD_WRITE_ZEROES, 4096, 1).validate(4096, false),
            Err(ENOSPC)
        );
        assert_eq!(r(CMD_TRIM, 4096, 1).validate(4096, false), Err(EINVAL));
        assert_eq!(r(99, 0, 0).validate(4096, false), Err(EINVAL));
        assert_eq!(r(5, 0, 0).validate(4096, false), Err(EINVAL)); // CACHE: not advertised
        assert_eq!(r(7, 0, 0).validate(4096, false), Err(EINVAL)); // BLOCK_STATUS: no contexts
        assert_eq!(r(CMD_FLUSH, 0, 0).validate(4096, false), Ok(()));
        assert_eq!(r(CMD_READ, 0, 0).validate(4096, false), Ok(()));
        let f = |kind, flags| Request {
            flags,
            kind,
            handle: 0,
            offset: 0,
            length: 512,
        };
        // FUA is accepted on every command; NO_HOLE only on WRITE_ZEROES.
        for kind in [CMD_READ, CMD_WRITE, CMD_FLUSH, CMD_TRIM, CMD_WRITE_ZEROES] {
            assert_eq!(f(kind, CMD_FLAG_FUA).validate(4096, false), Ok(()));
        }
        assert_eq!(
            f(CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE).validate(4096, false),
            Ok(())
        );
        assert_eq!(
            f(CMD_WRITE, CMD_FLAG_NO_HOLE).validate(4096, false),
            Err(EINVAL)
        );
        // DF (structured replies not negotiated), REQ_ONE, FAST_ZERO (not advertised), unknown.
        for flags in [1 << 2, 1 << 3, 1 << 4, 1 << 5, 1 << 15] {
            assert_eq!(f(CMD_READ, flags).validate(4096, false), Err(EINVAL));
            assert_eq!(
                f(CMD_WRITE_ZEROES, flags).validate(4096, false),
                Err(EINVAL)
            );
        }
    }

    #[test]
    fn bounded_message_cuts_at_a_char_boundary() {
        assert_eq!(bounded_message("abc"), "abc");
        let long = "é".repeat(MAX_STRING);
        let cut = bounded_message(&long);
        assert!(cut.len() <= MAX_STRING && cut.len() >= MAX_STRING - 1);
        assert!(long.starts_with(cut));
    }

    #[test]
    fn option_header_checks() {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
        b[8..12].copy_from_slice(&OPT_GO.to_be_bytes());
        b[12..16].copy_from_slice(&10u32.to_be_bytes());
        assert_eq!(parse_option_header(&b), Ok((OPT_GO, 10)));
        b[12..16].copy_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(parse_option_header(&b), Ok((OPT_GO, u32::MAX)));
        b[0] = 0;
        assert!(matches!(
            parse_option_header(&b),
            Err(ProtoError::BadOptionMagic(_))
        ));
    }
}
