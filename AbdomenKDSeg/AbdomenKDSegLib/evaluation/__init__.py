"""Scoring: DSC / NSD metrics and the FLARE-style `evaluate` command."""
