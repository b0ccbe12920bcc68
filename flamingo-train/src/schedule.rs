//! The learning rate of each optimizer step.

use crate::config::{DecayKind, ScheduleConfig};

/// Linear warm-up to the peak, then constant or a half cosine down to a floor.
#[derive(Debug, Clone, PartialEq)]
pub struct LrSchedule {
    pub peak: f32,
    pub warmup_steps: u64,
    pub decay: DecayKind,
    /// The cosine's floor, as a fraction of the peak.
    pub min_lr_ratio: f32,
    /// The step the cosine reaches its floor at.
    pub total_steps: u64,
}

impl LrSchedule {
    pub fn new(peak: f32, config: &ScheduleConfig, total_steps: u64) -> Self {
        Self { peak, warmup_steps: config.warmup_steps, decay: config.decay, min_lr_ratio: config.min_lr_ratio, total_steps }
    }

    /// Returns the learning rate of step `step`, counted from 1.
    ///
    /// Warm-up gives step s ≤ W the rate peak·s/W, so the first step
    /// already moves. The cosine runs from the peak after warm-up to
    /// `min_lr_ratio·peak` at `total_steps`.
    pub fn lr(&self, step: u64) -> f32 {
        let step = step.max(1);
        if step <= self.warmup_steps {
            return self.peak * step as f32 / self.warmup_steps as f32;
        }
        match self.decay {
            DecayKind::Constant => self.peak,
            DecayKind::Cosine => {
                let span = self.total_steps.saturating_sub(self.warmup_steps).max(1) as f64;
                let progress = ((step - self.warmup_steps) as f64 / span).min(1.0);
                let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
                let floor = self.min_lr_ratio as f64;
                (self.peak as f64 * (floor + (1.0 - floor) * cosine)) as f32
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule(decay: DecayKind) -> LrSchedule {
        LrSchedule { peak: 1.0, warmup_steps: 4, decay, min_lr_ratio: 0.1, total_steps: 14 }
    }

    #[test]
    fn warmup_rises_linearly() {
        let s = schedule(DecayKind::Constant);
        let rates: Vec<f32> = (1..=5).map(|step| s.lr(step)).collect();
        assert_eq!(rates, [0.25, 0.5, 0.75, 1.0, 1.0]);
    }

    #[test]
    fn constant_stays_at_peak() {
        let s = schedule(DecayKind::Constant);
        assert_eq!(s.lr(14), 1.0);
        assert_eq!(s.lr(100), 1.0);
    }

    #[test]
    fn cosine_reaches_floor_at_the_end() {
        let s = schedule(DecayKind::Cosine);
        assert_eq!(s.lr(4), 1.0);
        // Halfway through the decay, cos(π/2) = 0: floor + (1 − floor)/2.
        assert!((s.lr(9) - 0.55).abs() < 1e-6, "{}", s.lr(9));
        assert!((s.lr(14) - 0.1).abs() < 1e-6);
        assert!((s.lr(20) - 0.1).abs() < 1e-6, "past the end it stays at the floor");
    }

    #[test]
    fn no_warmup_starts_at_peak() {
        let s = LrSchedule { warmup_steps: 0, ..schedule(DecayKind::Cosine) };
        assert_eq!(s.lr(1), (1.0f64 * (0.1 + 0.9 * 0.5 * (1.0 + (std::f64::consts::PI / 14.0).cos()))) as f32);
    }
}
