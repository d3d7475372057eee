use candle_core::{Device, Tensor, Var, DType};
use std::time::Instant;
fn main() -> anyhow::Result<()> {
    let args: Vec<usize> = std::env::args().skip(1).map(|a| a.parse().unwrap()).collect();
    let (n, seq, d, seqk) = (args[0], args[1], args[2], args[3]);
    let dev = Device::Cpu;
    let q = Var::from_tensor(&Tensor::randn(0f32, 1., (n, seq, d), &dev)?)?;
    let k = Var::from_tensor(&Tensor::randn(0f32, 1., (n, seqk, d), &dev)?)?;
    let v = Var::from_tensor(&Tensor::randn(0f32, 1., (n, seqk, d), &dev)?)?;
    let flops = 2.0 * 2.0 * (n * seq * seqk * d) as f64;
    for _ in 0..4 {
        let t = Instant::now();
        let o = layerdiff::models::nn::attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), 0.158, None)?;
        let _ = o.sum_all()?.to_dtype(DType::F32)?.to_scalar::<f32>()?;
        let tf = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let g = (o.sqr()?.sum_all()?).backward()?;
        let _ = g.get(q.as_tensor()).unwrap().sum_all()?.to_scalar::<f32>()?;
        let tb = t.elapsed().as_secs_f64();
        println!("fwd {:.3} s ({:.1} GFLOPS)  bwd {:.3} s ({:.1} GFLOPS, 2.5x flops)", tf, flops / tf / 1e9, tb, 2.5 * flops / tb / 1e9);
    }
    Ok(())
}
