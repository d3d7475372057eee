// Copied into examples/ and built with --release: a LoRA-adapted frozen linear layer's forward and
// input gradient both ways, at the shapes of SD's adapted projections in a 256 px stage-2 step
// (batch 2), best of 20 after a warm-up; `count` is how many layers of each shape a UNet pass has
// (the weighted sum). See lora-probe.txt.
use candle_core::{Device, Result, Tensor};
use std::time::Instant;
fn best<F: FnMut() -> Result<Tensor>>(mut f: F) -> Result<f64> {
    f()?;
    let mut b = f64::MAX;
    for _ in 0..20 {
        let s = Instant::now();
        let t = f()?;
        drop(t);
        b = b.min(s.elapsed().as_secs_f64() * 1e3);
    }
    Ok(b)
}
fn main() -> Result<()> {
    let dev = Device::Cpu;
    let (mut tm, mut tu) = (0.0, 0.0);
    for &(rows, i, o, count) in &[(128usize, 1280usize, 1280usize, 36usize), (154, 768, 1280, 12), (154, 768, 640, 10), (154, 768, 320, 10), (512, 640, 640, 30), (2048, 320, 320, 30)] {
        let x = Tensor::randn(0f32, 1., (rows, i), &dev)?;
        let g = Tensor::randn(0f32, 1., (rows, o), &dev)?;
        let w = Tensor::randn(0f32, 0.02, (o, i), &dev)?;
        let a = Tensor::randn(0f32, 0.02, (4, i), &dev)?;
        let b = Tensor::randn(0f32, 0.02, (o, 4), &dev)?;
        let merged = best(|| {
            let y = x.matmul(&(&w + b.matmul(&a)?)?.t()?)?;
            let dx = g.matmul(&(&w + b.matmul(&a)?)?)?;
            Tensor::cat(&[y.flatten_all()?.narrow(0, 0, 1)?, dx.flatten_all()?.narrow(0, 0, 1)?], 0)
        })?;
        let lowrank = best(|| {
            let y = (x.matmul(&w.t()?)? + x.matmul(&a.t()?)?.matmul(&b.t()?)?)?;
            let dx = (g.matmul(&w)? + g.matmul(&b)?.matmul(&a)?)?;
            Tensor::cat(&[y.flatten_all()?.narrow(0, 0, 1)?, dx.flatten_all()?.narrow(0, 0, 1)?], 0)
        })?;
        tm += merged * count as f64;
        tu += lowrank * count as f64;
        println!("rows {rows:5} in {i:5} out {o:5} x{count:2}: merged {merged:6.2} ms, low-rank {lowrank:6.2} ms");
    }
    println!("a pass's adapted layers: merged {tm:.0} ms, low-rank {tu:.0} ms");
    Ok(())
}
