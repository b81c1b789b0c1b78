"""The cache engine: entries, tiers, the tiered read, write-behind. Nothing here knows HTTP.

Import from the module that holds a name (``from cache.tiered import TieredCache``): the package
re-exports nothing, so there is one place to find each name. docs/architecture.md draws the
modules and what each one holds.
"""
