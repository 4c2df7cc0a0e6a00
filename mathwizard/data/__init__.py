"""MM_Math data: fetching (Hub, local files, bundled sample), cleaning with a quarantine, and stable splits."""
