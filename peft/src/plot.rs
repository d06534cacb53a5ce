//! The loss-curve PNG written beside a trained adapter (plotters, with an embedded DejaVu font
//! so that it renders the same on any machine).

use std::path::Path;
use std::sync::Once;

use peft_core::{PeftError, Result};
use plotters::prelude::*;

static FONT: Once = Once::new();

fn register_font() {
    FONT.call_once(|| {
        // Registration only fails for invalid font data; the embedded font is valid.
        let _ = plotters::style::register_font(
            "sans-serif",
            FontStyle::Normal,
            dejavu::sans::regular(),
        );
    });
}

/// Draws the training loss per step (and evaluation loss, as points) into a PNG at `path`,
/// written atomically.
pub fn loss_curve(path: &Path, train: &[(usize, f64)], eval: &[(usize, f64)]) -> Result<()> {
    if train.is_empty() && eval.is_empty() {
        return Ok(());
    }
    register_font();
    let fail = |e: String| PeftError::io(path, std::io::Error::other(e));
    let (w, h) = (900u32, 540u32);
    let tmp = path.with_extension("partial.png");
    {
        let root = BitMapBackend::new(&tmp, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| fail(e.to_string()))?;
        let all = train
            .iter()
            .chain(eval)
            .map(|p| p.1)
            .filter(|v| v.is_finite());
        let (lo, hi) = all.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
            (a.min(v), b.max(v))
        });
        let pad = ((hi - lo) * 0.05).max(1e-3);
        let max_step = train
            .iter()
            .chain(eval)
            .map(|p| p.0)
            .max()
            .unwrap_or(1)
            .max(1);
        let mut chart = ChartBuilder::on(&root)
            .caption("Loss", ("sans-serif", 24))
            .margin(16)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0usize..max_step, (lo - pad)..(hi + pad))
            .map_err(|e| fail(e.to_string()))?;
        chart
            .configure_mesh()
            .x_desc("optimizer step")
            .y_desc("loss")
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(|e| fail(e.to_string()))?;
        if !train.is_empty() {
            chart
                .draw_series(LineSeries::new(train.iter().copied(), BLUE.stroke_width(2)))
                .map_err(|e| fail(e.to_string()))?
                .label("train")
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE.stroke_width(2)));
        }
        if !eval.is_empty() {
            chart
                .draw_series(LineSeries::new(eval.iter().copied(), RED.stroke_width(2)))
                .map_err(|e| fail(e.to_string()))?;
            chart
                .draw_series(
                    eval.iter()
                        .map(|&(s, l)| Circle::new((s, l), 4, RED.filled())),
                )
                .map_err(|e| fail(e.to_string()))?
                .label("eval")
                .legend(|(x, y)| Circle::new((x + 10, y), 4, RED.filled()));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .label_font(("sans-serif", 14))
            .draw()
            .map_err(|e| fail(e.to_string()))?;
        root.present().map_err(|e| fail(e.to_string()))?;
    }
    std::fs::rename(&tmp, path).map_err(|e| PeftError::io(path, e))
}
