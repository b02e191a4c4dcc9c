//! Real processes for tests and benchmarks (feature `testkit`): a private etcd cluster on
//! loopback ports that can be killed, frozen and restarted member by member.

pub mod etcd;
