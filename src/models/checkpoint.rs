//! Gradient checkpointing: a forward pass as a chain of segments whose inner activations are not
//! kept. candle keeps every tensor on the graph until the backward pass ends; for a training step
//! of the full-size UNet at 512 px that is several GiB.
//!
//! A model writes its forward once, generic over [`Segments`]: [`Direct`] runs it as a plain
//! forward; a [`Tape`] runs each segment on a copy of the model whose weights are detached (no
//! graph: only the segments' inputs and outputs stay) and records it. [`Tape::backward`] then runs
//! the segments again in reverse, each on the trainable model, and backpropagates through one
//! segment at a time: the vector-Jacobian product of a segment's outputs `y` with their gradients
//! `g` is the gradient of the scalar `sum(y g)`. At most one segment's activations exist at a
//! time, for the price of one more forward pass. The weights' gradients reach a callback per
//! segment, where an optimizer can step them, so not all of them exist at once either; each
//! weight must belong to one segment (a shared weight would be stepped once per segment).

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, Var};

/// A forward pass of segments, each `f(model, inputs) -> outputs`.
pub trait Segments<M> {
    /// What the pass handles between segments: tensors, or a [`Tape`]'s handles to them.
    type Value: Clone;

    /// Runs one segment. Each weight `f` reads must be read by no other segment.
    fn run(&mut self, inputs: &[Self::Value], f: impl Fn(&M, &[Tensor]) -> Result<Vec<Tensor>> + 'static) -> Result<Vec<Self::Value>>;

    /// The dimensions of a value.
    fn dims(&self, value: &Self::Value) -> Vec<usize>;

    /// [`Segments::run`] for a segment of one output.
    fn run1(&mut self, inputs: &[Self::Value], f: impl Fn(&M, &[Tensor]) -> Result<Tensor> + 'static) -> Result<Self::Value> {
        let mut outputs = self.run(inputs, move |m, x| Ok(vec![f(m, x)?]))?;
        Ok(outputs.remove(0))
    }
}

/// The plain forward: each segment on the model as it is.
pub struct Direct<'m, M>(pub &'m M);

impl<M> Segments<M> for Direct<'_, M> {
    type Value = Tensor;

    fn run(&mut self, inputs: &[Tensor], f: impl Fn(&M, &[Tensor]) -> Result<Vec<Tensor>> + 'static) -> Result<Vec<Tensor>> {
        f(self.0, inputs)
    }

    fn dims(&self, value: &Tensor) -> Vec<usize> {
        value.dims().to_vec()
    }
}

/// A value of a [`Tape`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Value(usize);

type SegmentFn<M> = Box<dyn Fn(&M, &[Tensor]) -> Result<Vec<Tensor>>>;

struct Segment<M> {
    inputs: Vec<Value>,
    outputs: Vec<Value>,
    f: SegmentFn<M>,
}

/// A forward pass run without a graph and recorded, to be backpropagated segment by segment.
pub struct Tape<'m, M> {
    /// The model the forward runs on: the trainable one's weights, detached.
    frozen: &'m M,
    values: Vec<Tensor>,
    /// Per value: whether its gradient is wanted (segment outputs, and the inputs that ask).
    wants_grad: Vec<bool>,
    /// The inputs whose gradients [`Tape::backward`] returns.
    asked: Vec<Value>,
    segments: Vec<Segment<M>>,
}

impl<'m, M> Tape<'m, M> {
    /// `frozen`: the model with its weights detached (sharing storage with the trainable one).
    pub fn new(frozen: &'m M) -> Self {
        Self { frozen, values: Vec::new(), wants_grad: Vec::new(), asked: Vec::new(), segments: Vec::new() }
    }

    /// An input of the pass; `grad`: whether [`Tape::backward`] returns its gradient.
    pub fn input(&mut self, t: &Tensor, grad: bool) -> Value {
        let v = self.push(t.detach(), grad);
        if grad {
            self.asked.push(v);
        }
        v
    }

    fn push(&mut self, t: Tensor, grad: bool) -> Value {
        self.values.push(t);
        self.wants_grad.push(grad);
        Value(self.values.len() - 1)
    }

    /// A value as the forward computed it (detached).
    pub fn value(&self, v: Value) -> &Tensor {
        &self.values[v.0]
    }

    /// Backpropagates `grads` (of values, summed where one appears twice) through the segments in
    /// reverse, each run again on `trainable`; `on_weights` gets each segment's gradients (of its
    /// weights that are variables) before the next segment runs. Returns the gradients of the
    /// inputs that asked for one, in the order asked (`None` where the output does not depend on
    /// that input).
    pub fn backward<E: From<candle_core::Error>>(
        self,
        trainable: &M,
        grads: Vec<(Value, Tensor)>,
        mut on_weights: impl FnMut(&GradStore) -> std::result::Result<(), E>,
    ) -> std::result::Result<Vec<(Value, Option<Tensor>)>, E> {
        let Tape { values, wants_grad, asked, segments, .. } = self;
        let mut acc: Vec<Option<Tensor>> = vec![None; values.len()];
        for (v, g) in grads {
            add_grad(&mut acc[v.0], g.detach())?;
        }
        for segment in segments.into_iter().rev() {
            let outs: Vec<(usize, Tensor)> =
                segment.outputs.iter().enumerate().filter_map(|(j, o)| acc[o.0].take().map(|g| (j, g))).collect();
            if outs.is_empty() {
                continue;
            }
            // The inputs whose gradients are wanted as leaves (`Var::from_tensor` copies them).
            let vars: Vec<Option<Var>> = segment
                .inputs
                .iter()
                .map(|i| if wants_grad[i.0] { Var::from_tensor(&values[i.0]).map(Some) } else { Ok(None) })
                .collect::<Result<_>>()?;
            let inputs: Vec<Tensor> = segment
                .inputs
                .iter()
                .zip(&vars)
                .map(|(i, var)| var.as_ref().map_or_else(|| values[i.0].clone(), |v| v.as_tensor().clone()))
                .collect();
            let ys = (segment.f)(trainable, &inputs)?;
            if ys.len() != segment.outputs.len() {
                let msg = format!("a segment gave {} outputs in the backward, {} in the forward", ys.len(), segment.outputs.len());
                return Err(candle_core::Error::Msg(msg).into());
            }
            let terms: Vec<Tensor> =
                outs.into_iter().map(|(j, g)| (&ys[j] * g.to_dtype(ys[j].dtype())?)?.sum_all()).collect::<Result<_>>()?;
            let store = Tensor::stack(&terms, 0)?.sum_all()?.backward()?;
            for (i, var) in segment.inputs.iter().zip(&vars) {
                if let Some(g) = var.as_ref().and_then(|v| store.get(v.as_tensor())) {
                    // Detached: candle's gradients can record how they were computed (from the
                    // segment's weights), which the next segment's backward would follow.
                    add_grad(&mut acc[i.0], g.detach())?;
                }
            }
            on_weights(&store)?;
        }
        Ok(asked.into_iter().map(|v| (v, acc[v.0].take())).collect())
    }
}

fn add_grad(slot: &mut Option<Tensor>, g: Tensor) -> Result<()> {
    *slot = Some(match slot.take() {
        Some(s) => (s + g)?,
        None => g,
    });
    Ok(())
}

impl<M> Segments<M> for Tape<'_, M> {
    type Value = Value;

    fn run(&mut self, inputs: &[Value], f: impl Fn(&M, &[Tensor]) -> Result<Vec<Tensor>> + 'static) -> Result<Vec<Value>> {
        let xs: Vec<Tensor> = inputs.iter().map(|v| self.values[v.0].clone()).collect();
        let ys = f(self.frozen, &xs)?;
        let outputs: Vec<Value> = ys.into_iter().map(|y| self.push(y.detach(), true)).collect();
        self.segments.push(Segment { inputs: inputs.to_vec(), outputs: outputs.clone(), f: Box::new(f) });
        Ok(outputs)
    }

    fn dims(&self, value: &Value) -> Vec<usize> {
        self.values[value.0].dims().to_vec()
    }
}
