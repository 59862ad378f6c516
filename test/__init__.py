"""Tests, the real-process harness and the benchmark of raft-demo."""
