"""DNA records to device batches: sources, windows, held-out records, packing, collation, the resumable loader.

May import runtime/.
"""
