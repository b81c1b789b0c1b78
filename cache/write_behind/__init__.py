"""Write-behind: writes acknowledged once they are in the durable queue, sent to the origin later
by the flusher (coalesced, batched, retried)."""
