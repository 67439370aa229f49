// Message ids seen recently, bounded: the oldest are forgotten first. A
// redelivered message (its ACK was lost with the connection) is dropped by
// id, and acked again when it was acked before.

export type Seen = "new" | "duplicate_unacked" | "duplicate_acked";

export class DedupFilter {
  /** id -> acked; a Map keeps insertion order, so the first key is the oldest. */
  private readonly ids = new Map<bigint, boolean>();

  constructor(private readonly capacity: number) {}

  check(id: bigint): Seen {
    const acked = this.ids.get(id);
    if (acked === undefined) return "new";
    return acked ? "duplicate_acked" : "duplicate_unacked";
  }

  insert(id: bigint): void {
    if (this.ids.has(id)) return;
    this.ids.set(id, false);
    while (this.ids.size > this.capacity) {
      const oldest = this.ids.keys().next().value;
      if (oldest === undefined) break;
      this.ids.delete(oldest);
    }
  }

  /** Marks `id` acked (remembering it if it was not). */
  markAcked(id: bigint): void {
    if (!this.ids.has(id)) this.insert(id);
    this.ids.set(id, true);
  }

  /** Forgets `id`: a handler failed, so the redelivery must reach the app. */
  forget(id: bigint): void {
    this.ids.delete(id);
  }

  get size(): number {
    return this.ids.size;
  }
}
