//! Operations: what the gateway shows its operators.
//!
//! The admin thread (`admin/`, `wsgate-admin`) serves `/metrics`, `/livez`,
//! `/readyz`, `/lobbies` and the dashboard on its own listener; `metrics.rs`
//! encodes the counters for Prometheus, on the admin thread or an
//! embedder's; `health.rs` computes liveness and readiness. All of it reads
//! the counters every thread bumps (`stats.rs`) and asks the manager for its
//! lobby list; none of it touches a client.

#[cfg(feature = "admin")]
pub(crate) mod admin;
pub(crate) mod health;
#[cfg(feature = "admin")]
pub mod metrics;
