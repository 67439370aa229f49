// Jittered, capped exponential backoff ("equal jitter", as the Rust SDK):
// attempt n waits a uniformly random time in [base/2, base], where
// base = min(max, min * 2^n). The jitter spreads the reconnects of many
// devices after a room dies.

export class Backoff {
  private attempt = 0;
  private readonly min: number;
  private readonly max: number;

  constructor(minMs: number, maxMs: number, private readonly random: () => number = Math.random) {
    this.min = Math.max(1, minMs);
    this.max = Math.max(this.min, maxMs);
  }

  /** The un-jittered upper bound of the next delay. */
  base(): number {
    return Math.min(this.max, this.min * 2 ** Math.min(this.attempt, 20));
  }

  nextDelayMs(): number {
    const base = this.base();
    this.attempt += 1;
    const low = base / 2;
    return Math.round(low + this.random() * (base - low));
  }

  get attempts(): number {
    return this.attempt;
  }

  reset(): void {
    this.attempt = 0;
  }
}
