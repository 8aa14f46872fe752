"""Stage 1, zips -> verified shards (never imports torch): zip reading, member names, convert,
the catalog (records and manifest), verify, synth."""
