"""The job pipeline every endpoint uses: `JobPipeline` submits, cancels and reads jobs;
`JobReader` follows a job's events (replay log + live channel) from any cursor. Endpoint
adapters (`api.endpoints`) turn their requests into job records and render the events
as their own wire objects."""
