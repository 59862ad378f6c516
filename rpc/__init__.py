"""Code generated from protos/raft.proto; never edited by hand (see README, "Regenerating rpc/")."""
