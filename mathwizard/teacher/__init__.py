"""The teacher: rewrites MM_Math solutions into numbered steps, through an OpenAI-compatible API or offline rules."""
