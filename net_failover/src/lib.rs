//! net_failover
