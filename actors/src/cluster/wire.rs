//! Frames of the data link (hidden states between nodes), serialized with rkyv and length-delimited on TCP.
//! Hidden states travel as f32: the placements must agree with each other to 1e-4.

use crate::error::{Error, Result};
use rkyv::{Archive, Deserialize, Serialize};

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub enum Frame {
    /// Server → client, first frame: the nonce to prove the shared secret against.
    Challenge {
        nonce: Vec<u8>,
    },
    /// Client → server: who calls, and the proof of the secret and the placement (`link::Trust`).
    Hello {
        node: String,
        proof: Vec<u8>,
    },
    /// Server → client: accepted, by node `node`.
    Welcome {
        node: String,
    },
    Refused {
        reason: String,
    },
    Request {
        id: u64,
        body: Request,
    },
    Reply {
        id: u64,
        body: Reply,
    },
    Ping {
        t: u64,
    },
    Pong {
        t: u64,
    },
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub enum Request {
    /// Expert-split: the rows routed to this node's experts of `layer`, with their (row, expert, weight).
    Experts {
        layer: u32,
        cols: u32,
        hidden: Floats,
        assignments: Vec<Routed>,
    },
    /// Layer-split: run layers `start..end` for these sequences' new tokens (the rows of `hidden`, in order).
    Layers {
        start: u32,
        end: u32,
        seqs: Vec<SeqTokens>,
        cols: u32,
        hidden: Floats,
    },
    /// Drop these sequences' caches.
    Release { seqs: Vec<u64> },
    /// Start sequence `to` with the first `len` cached tokens of `from`.
    Fork { from: u64, to: u64, len: u32 },
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq)]
pub struct Routed {
    pub row: u32,
    pub expert: u32,
    pub weight: f32,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq)]
pub struct SeqTokens {
    pub seq: u64,
    pub tokens: u32,
    /// How many of its last rows the reply holds (`tokens`, or fewer after the model's last layer).
    pub outputs: u32,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub enum Reply {
    Hidden { cols: u32, data: Floats },
    Done,
    Failed { message: String },
}

/// f32 values as little-endian bytes: archived and restored with a copy, not element by element.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Floats(pub Vec<u8>);

impl Floats {
    pub fn from_f32(v: &[f32]) -> Floats {
        let mut b = Vec::with_capacity(v.len() * 4);
        for x in v {
            b.extend_from_slice(&x.to_le_bytes());
        }
        Floats(b)
    }

    pub fn to_f32(&self) -> Vec<f32> {
        self.0
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    }

    pub fn len(&self) -> usize {
        self.0.len() / 4
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

pub fn encode(f: &Frame) -> Result<bytes::Bytes> {
    let v = rkyv::to_bytes::<rkyv::rancor::Error>(f)
        .map_err(|e| Error::Cluster(format!("encoding a frame: {e}")))?;
    Ok(bytes::Bytes::from(v.into_vec()))
}

pub fn decode(b: &[u8]) -> Result<Frame> {
    // Frames arrive at any offset; rkyv needs its alignment, so copy once.
    let mut aligned = rkyv::util::AlignedVec::<16>::with_capacity(b.len());
    aligned.extend_from_slice(b);
    rkyv::from_bytes::<Frame, rkyv::rancor::Error>(&aligned)
        .map_err(|e| Error::Cluster(format!("a malformed frame: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        let f = Frame::Request {
            id: 7,
            body: Request::Experts {
                layer: 3,
                cols: 2,
                hidden: Floats::from_f32(&[1.5, -2.0, 0.25, 1e-7]),
                assignments: vec![Routed {
                    row: 1,
                    expert: 9,
                    weight: 0.5,
                }],
            },
        };
        assert_eq!(decode(&encode(&f).unwrap()).unwrap(), f);
        assert!(decode(b"garbage").is_err());
    }
}
