//! DNS messages, read and made with hickory-proto: the app's query (one
//! question), the answers the forwarder makes itself (`hosts`, NXDOMAIN,
//! SERVFAIL), and what a resolver's answer says (its code, the addresses
//! each name got, the shortest TTL). What the forwarder relays is the
//! resolver's own bytes; nothing here rewrites them.

use std::{net::IpAddr, time::Duration};

use hickory_proto::{
    op::{Edns, Header, Message, MessageType, OpCode, Query as Question, ResponseCode},
    rr::{
        RData, Record, RecordType,
        rdata::{A, AAAA},
    },
    serialize::binary::{BinDecodable, BinDecoder},
};

/// A message the forwarder will not take.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("not a DNS message: {0}")]
    Malformed(String),
    #[error("not a standard query with one question")]
    NotAQuery,
    #[error("the answer does not match the query (id or question)")]
    Mismatch,
}

/// The app's query.
#[derive(Debug)]
pub struct Query {
    msg: Message,
    /// The question's name, lowercase, without the trailing dot.
    pub name: String,
    pub qtype: RecordType,
}

impl Query {
    pub fn parse(bytes: &[u8]) -> Result<Query, WireError> {
        let msg = Message::from_vec(bytes).map_err(|e| WireError::Malformed(e.to_string()))?;
        let m = &msg.metadata;
        if m.message_type != MessageType::Query
            || m.op_code != OpCode::Query
            || msg.queries.len() != 1
        {
            return Err(WireError::NotAQuery);
        }
        let q = &msg.queries[0];
        let name = q.name().to_lowercase().to_ascii();
        let name = name.strip_suffix('.').unwrap_or(&name).to_string();
        let qtype = q.query_type();
        Ok(Query { msg, name, qtype })
    }

    pub fn id(&self) -> u16 {
        self.msg.metadata.id
    }

    /// The largest UDP answer the app takes (EDNS, else 512 as RFC 1035).
    pub fn max_udp_answer(&self) -> usize {
        self.msg
            .edns
            .as_ref()
            .map_or(512, |e| usize::from(e.max_payload().max(512)))
    }

    /// An answer of the forwarder's own: `rcode`, and `ips` (those of the
    /// question's type) as records of `ttl`.
    pub fn answer(&self, rcode: ResponseCode, ips: &[IpAddr], ttl: Duration) -> Vec<u8> {
        let mut r = Message::response(self.id(), OpCode::Query);
        r.metadata.recursion_desired = self.msg.metadata.recursion_desired;
        r.metadata.recursion_available = true;
        r.metadata.authoritative = rcode == ResponseCode::NoError;
        r.metadata.response_code = rcode;
        r.add_query(self.msg.queries[0].clone());
        let name = self.msg.queries[0].name().clone();
        let ttl = u32::try_from(ttl.as_secs()).unwrap_or(u32::MAX);
        for ip in ips {
            let data = match (ip, self.qtype) {
                (IpAddr::V4(a), RecordType::A) => RData::A(A(*a)),
                (IpAddr::V6(a), RecordType::AAAA) => RData::AAAA(AAAA(*a)),
                _ => continue,
            };
            r.add_answer(Record::from_rdata(name.clone(), ttl, data));
        }
        if self.msg.edns.is_some() {
            // RFC 6891: a query with OPT gets an answer with OPT.
            r.set_edns(Edns::new());
        }
        // A message made from a parsed query always encodes; an empty
        // vector (the app times out) is the answer if it ever did not.
        r.to_vec().unwrap_or_default()
    }
}

/// What a resolver's answer says.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Answer {
    /// As dig names it: NOERROR, NXDOMAIN, SERVFAIL...
    pub rcode: &'static str,
    /// Records in the answer section.
    pub count: usize,
    /// Each owner name (lowercase, no trailing dot) with its addresses
    /// (read only when asked for).
    pub names: Vec<(String, Vec<IpAddr>)>,
    /// The shortest TTL of the address records.
    pub ttl: Duration,
}

impl Answer {
    /// Reads `bytes` as the answer to `q`: same id, same question; `full`:
    /// its address records too, else only the header and question (what
    /// relaying it needs).
    pub fn read(q: &Query, bytes: &[u8], full: bool) -> Result<Answer, WireError> {
        if !full {
            return Answer::head(q, bytes);
        }
        let msg = Message::from_vec(bytes).map_err(|e| WireError::Malformed(e.to_string()))?;
        if msg.metadata.id != q.id()
            || msg.metadata.message_type != MessageType::Response
            || msg.queries.first() != q.msg.queries.first()
        {
            return Err(WireError::Mismatch);
        }
        let mut names: Vec<(String, Vec<IpAddr>)> = Vec::new();
        let mut ttl = u32::MAX;
        let mut count = 0;
        for r in &msg.answers {
            let ip = match &r.data {
                RData::A(a) => IpAddr::V4(a.0),
                RData::AAAA(a) => IpAddr::V6(a.0),
                _ => continue,
            };
            count += 1;
            ttl = ttl.min(r.ttl);
            let owner = r.name.to_lowercase().to_ascii();
            let owner = owner.strip_suffix('.').unwrap_or(&owner).to_string();
            match names.iter_mut().find(|(n, _)| *n == owner) {
                Some((_, ips)) => ips.push(ip),
                None => names.push((owner, vec![ip])),
            }
        }
        Ok(Answer {
            rcode: rcode_name(msg.metadata.response_code),
            count: msg.answers.len(),
            names,
            ttl: Duration::from_secs(if count == 0 { 0 } else { u64::from(ttl) }),
        })
    }

    /// The header and the question only.
    fn head(q: &Query, bytes: &[u8]) -> Result<Answer, WireError> {
        let bad =
            |e: hickory_proto::serialize::binary::DecodeError| WireError::Malformed(e.to_string());
        let mut d = BinDecoder::new(bytes);
        let h = Header::read(&mut d).map_err(bad)?;
        let question = (h.counts.queries == 1)
            .then(|| Question::read(&mut d))
            .transpose()
            .map_err(bad)?;
        if h.metadata.id != q.id()
            || h.metadata.message_type != MessageType::Response
            || question.as_ref() != q.msg.queries.first()
        {
            return Err(WireError::Mismatch);
        }
        Ok(Answer {
            rcode: rcode_name(h.metadata.response_code),
            count: usize::from(h.counts.answers),
            names: Vec::new(),
            ttl: Duration::ZERO,
        })
    }

    /// Every address in the answer (the question's, through any CNAMEs).
    pub fn addresses(&self) -> Vec<IpAddr> {
        self.names
            .iter()
            .flat_map(|(_, ips)| ips.iter().copied())
            .collect()
    }
}

/// A response code as dig names it (metrics and access logs).
pub fn rcode_name(c: ResponseCode) -> &'static str {
    match c {
        ResponseCode::NoError => "NOERROR",
        ResponseCode::FormErr => "FORMERR",
        ResponseCode::ServFail => "SERVFAIL",
        ResponseCode::NXDomain => "NXDOMAIN",
        ResponseCode::NotImp => "NOTIMP",
        ResponseCode::Refused => "REFUSED",
        _ => "OTHER",
    }
}

#[cfg(test)]
mod tests {
    use hickory_proto::{op::Query as Question, rr::Name};

    use super::*;

    fn query(name: &str, t: RecordType, edns: bool) -> Vec<u8> {
        let mut m = Message::new(0x1234, MessageType::Query, OpCode::Query);
        m.metadata.recursion_desired = true;
        m.add_query(Question::query(Name::from_ascii(name).unwrap(), t));
        if edns {
            let mut e = Edns::new();
            e.set_max_payload(1232);
            m.set_edns(e);
        }
        m.to_vec().unwrap()
    }

    #[test]
    fn queries_and_answers_of_our_own() {
        let q = Query::parse(&query("DB.Internal.", RecordType::A, true)).unwrap();
        assert_eq!((q.name.as_str(), q.qtype), ("db.internal", RecordType::A));
        assert_eq!(q.max_udp_answer(), 1232);
        let ips: Vec<IpAddr> = vec!["10.0.0.1".parse().unwrap(), "fd00::1".parse().unwrap()];
        let bytes = q.answer(ResponseCode::NoError, &ips, Duration::from_secs(30));
        let head = Answer::read(&q, &bytes, false).unwrap();
        assert_eq!((head.rcode, head.count), ("NOERROR", 1));
        assert!(head.names.is_empty());
        let a = Answer::read(&q, &bytes, true).unwrap();
        assert_eq!(a.rcode, "NOERROR");
        assert_eq!(a.count, 1, "only the question's type");
        assert_eq!(a.names, vec![("db.internal".to_string(), vec![ips[0]])]);
        assert_eq!(a.ttl, Duration::from_secs(30));
        let nx = Answer::read(
            &q,
            &q.answer(ResponseCode::NXDomain, &[], Duration::ZERO),
            true,
        )
        .unwrap();
        assert_eq!((nx.rcode, nx.count), ("NXDOMAIN", 0));
        let q6 = Query::parse(&query("db.internal", RecordType::AAAA, false)).unwrap();
        assert_eq!(q6.max_udp_answer(), 512);
        let a6 = Answer::read(
            &q6,
            &q6.answer(ResponseCode::NoError, &ips, Duration::from_secs(5)),
            true,
        )
        .unwrap();
        assert_eq!(a6.addresses(), vec![ips[1]]);
    }

    #[test]
    fn what_is_refused() {
        assert!(matches!(
            Query::parse(b"\x00\x01junk"),
            Err(WireError::Malformed(_))
        ));
        let q = Query::parse(&query("a.test", RecordType::A, false)).unwrap();
        // A query is no answer; an answer to another question neither.
        for full in [true, false] {
            assert_eq!(
                Answer::read(&q, &query("a.test", RecordType::A, false), full),
                Err(WireError::Mismatch)
            );
        }
        let other = Query::parse(&query("b.test", RecordType::A, false)).unwrap();
        let wrong = other.answer(ResponseCode::NoError, &[], Duration::ZERO);
        for full in [true, false] {
            assert_eq!(Answer::read(&q, &wrong, full), Err(WireError::Mismatch));
        }
        let mut resp = Message::response(1, OpCode::Query);
        resp.add_query(Question::query(
            Name::from_ascii("a.test").unwrap(),
            RecordType::A,
        ));
        assert_eq!(
            Query::parse(&resp.to_vec().unwrap()).unwrap_err(),
            WireError::NotAQuery
        );
    }
}
