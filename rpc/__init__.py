"""Code generated from protos/raft.proto; never edited by hand (see docs/testing.md, "Regenerating rpc/")."""
