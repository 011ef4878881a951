//! A DNS server of the test's own on a free loopback UDP port: answers A, AAAA and SRV
//! queries from a zone the test changes while it runs, SERVFAIL where told, NXDOMAIN
//! for names it does not know. Messages are read and written by hickory-proto; the
//! server itself is one loop. Every record has a TTL of 0.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, SRV};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use tokio::net::UdpSocket;

/// What a name answers.
#[derive(Debug, Clone)]
pub enum Answer {
    Addresses(Vec<IpAddr>),
    /// (priority, weight, port, target name) per record.
    Srv(Vec<(u16, u16, u16, String)>),
    ServFail,
    /// These A records, and SERVFAIL to an AAAA query (one family's query failing).
    ServFailAaaa(Vec<IpAddr>),
}

pub struct Dns {
    pub addr: SocketAddr,
    zone: Arc<Mutex<HashMap<String, Answer>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Dns {
    pub async fn start() -> Dns {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        let zone: Arc<Mutex<HashMap<String, Answer>>> = Arc::default();
        let shared = Arc::clone(&zone);
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            while let Ok((n, from)) = socket.recv_from(&mut buf).await {
                let Ok(query) = Message::from_vec(&buf[..n]) else {
                    continue;
                };
                let answer = answer(&query, &shared.lock().unwrap());
                if let Ok(bytes) = answer.to_vec() {
                    let _ = socket.send_to(&bytes, from).await;
                }
            }
        });
        Dns { addr, zone, task }
    }

    /// Sets what `name` answers from now on.
    pub fn set(&self, name: &str, answer: Answer) {
        self.zone.lock().unwrap().insert(name.to_string(), answer);
    }
}

impl Drop for Dns {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn answer(query: &Message, zone: &HashMap<String, Answer>) -> Message {
    let mut response = Message::response(query.metadata.id, OpCode::Query);
    response.metadata.message_type = MessageType::Response;
    response.metadata.authoritative = true;
    response.metadata.recursion_desired = query.metadata.recursion_desired;
    response.metadata.recursion_available = true;
    let Some(q) = query.queries.first() else {
        response.metadata.response_code = ResponseCode::FormErr;
        return response;
    };
    response.add_query(q.clone());
    let asked = q.name().to_string();
    let key = asked.trim_end_matches('.');
    let name = q.name().clone();
    match zone.get(key) {
        None => response.metadata.response_code = ResponseCode::NXDomain,
        Some(Answer::ServFail) => response.metadata.response_code = ResponseCode::ServFail,
        Some(Answer::ServFailAaaa(_)) if q.query_type() == RecordType::AAAA => {
            response.metadata.response_code = ResponseCode::ServFail
        }
        Some(Answer::ServFailAaaa(ips)) => {
            for ip in ips.iter().filter(|_| q.query_type() == RecordType::A) {
                if let IpAddr::V4(v4) = ip {
                    response.add_answer(Record::from_rdata(name.clone(), 0, RData::A(A(*v4))));
                }
            }
        }
        Some(Answer::Addresses(ips)) => {
            for ip in ips {
                let data = match (ip, q.query_type()) {
                    (IpAddr::V4(v4), RecordType::A) => RData::A(A(*v4)),
                    (IpAddr::V6(v6), RecordType::AAAA) => RData::AAAA(AAAA(*v6)),
                    _ => continue,
                };
                response.add_answer(Record::from_rdata(name.clone(), 0, data));
            }
        }
        Some(Answer::Srv(records)) if q.query_type() == RecordType::SRV => {
            for (priority, weight, port, target) in records {
                let target = Name::from_ascii(format!("{target}.")).unwrap();
                let srv = SRV::new(*priority, *weight, *port, target);
                response.add_answer(Record::from_rdata(name.clone(), 0, RData::SRV(srv)));
            }
        }
        Some(Answer::Srv(_)) => {}
    }
    response
}
