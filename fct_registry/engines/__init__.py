"""Upgrade engines: the chain shared by all, the output shard as the unit of work, local threads, Ray tasks."""
