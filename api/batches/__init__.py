"""The Batch API: `service` (the API's objects), `runner` (drives batches: slots, lines,
finalizing), `input` (checking and reading input files), `results` (output files),
`records` (the batch record in Redis)."""
