"""Entrypoints for `ray job submit`: each one configures a library call and stops there."""
