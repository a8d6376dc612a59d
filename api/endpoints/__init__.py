"""Endpoint adapters: each turns its requests into job records for the job pipeline
(`api.jobs`) and renders the job's events as its own wire objects."""
