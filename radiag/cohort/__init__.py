"""Cohorts: canonical schema, readers (ADNIMERGE, AIBL, mapped CSV), synthetic generator,
validation, subject splits, patient descriptions and synthetic MRI."""
